"""Inference: safe image decoding, Predictor (sizes, batching, TTA) and the `tumorseg predict` command."""

from __future__ import annotations

import csv
import io
import struct
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import blob_pair, brightness_model
from tumorseg.cli import main
from tumorseg.inference import InputImageError, Predictor, decode_image, list_inputs, read_image, unique_stems
from tumorseg.metrics import dice


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "bright.keras"
    brightness_model().save(path)
    return path


@pytest.fixture(scope="module")
def predictor(model_path: Path) -> Predictor:
    return Predictor.load(str(model_path))


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def test_small_predicted_blobs_are_dropped_on_request(model_path: Path):
    image, _ = blob_pair(64, seed=2, radius=12)
    image[2:5, 2:5] = 255  # a bright 9 px speck far from the tumour
    kept = Predictor.load(str(model_path)).predict([image])[0]
    cleaned = Predictor.load(str(model_path), min_component_px=20).predict([image])[0]
    assert kept.mask[3, 3] == 255 and cleaned.mask[3, 3] == 0  # the speck goes
    assert 0 < kept.area_px - cleaned.area_px <= 20  # and only the speck
    with pytest.raises(ValueError, match="min_component_px"):
        Predictor.load(str(model_path), min_component_px=-1)


# --- ensembles --------------------------------------------------------------------------------


class ConstantBackend:
    """Probability ``value`` everywhere at its own input size; remembers the batch shapes it saw."""

    name = "const"

    def __init__(self, size: int, value: float) -> None:
        self.input_size, self.value, self.seen = size, value, []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.seen.append(batch.shape)
        return np.full(batch.shape, self.value, np.float32)


def test_ensemble_averages_members_each_at_its_own_input_size():
    small, large = ConstantBackend(32, 0.2), ConstantBackend(64, 0.6)
    ensemble = Predictor([small, large], batch_size=2)
    assert ensemble.input_size == 64 and ensemble.name == "ensemble(const+const)" and ensemble.is_ensemble
    maps = ensemble.probability_maps([np.zeros((48, 40), np.uint8)] * 3)
    assert [m.shape for m in maps] == [(48, 40)] * 3 and all(m == pytest.approx(np.full_like(m, 0.4)) for m in maps)
    assert small.seen == [(2, 32, 32, 1), (1, 32, 32, 1)] and large.seen == [(2, 64, 64, 1), (1, 64, 64, 1)]  # each at its own size
    with pytest.raises(ValueError, match="no single back-end"):
        _ = ensemble.backend
    with pytest.raises(ValueError, match="at least one model"):
        Predictor([])


def test_predictor_of_several_models_is_their_mean_at_the_images_size(tmp_path: Path, model_path: Path):
    large_path = tmp_path / "bright64.keras"
    brightness_model(64).save(large_path)
    image, truth = blob_pair(64, seed=3, radius=12)
    singles = [Predictor.load(str(path)).predict([image])[0].probability for path in (model_path, large_path)]
    ensemble = Predictor.load([str(model_path), str(large_path)])
    assert ensemble.model is None and ensemble.input_size == 64 and ensemble.name.startswith("ensemble")
    result = ensemble.predict([image])[0]
    assert result.probability.shape == (64, 64)
    assert np.abs(result.probability - (singles[0] + singles[1]) / 2).max() < 1e-6  # the mean at the image's size
    assert dice(truth > 0, result.mask > 0) > 0.8
    assert Predictor.load([str(model_path)]).input_size == 32  # one model in a list: just that model


# --- decoding ---------------------------------------------------------------------------------


def test_decode_accepts_common_formats_depths_and_channels(tmp_path: Path):
    gray, _ = blob_pair(40, seed=1)
    colour = np.dstack([gray, np.roll(gray, 3, axis=1), 255 - gray])
    cases = {
        "gray.png": (png(gray), gray),
        "gray.bmp": (cv2.imencode(".bmp", gray)[1].tobytes(), gray),
        "gray.tif": (cv2.imencode(".tif", gray)[1].tobytes(), gray),
        "colour.png": (png(colour), cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)),
        "rgba.png": (png(np.dstack([colour, np.full_like(gray, 128)])), cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)),
    }
    for name, (data, expected) in cases.items():
        image = decode_image(data, name)
        assert image.dtype == np.uint8 and image.shape == (40, 40), name
        np.testing.assert_array_equal(image, expected, err_msg=name)
    # 16-bit: stretched min..max to 0..255
    ramp16 = np.tile(np.linspace(1000, 3000, 40).astype(np.uint16), (40, 1))
    decoded = decode_image(png(ramp16), "ramp16.png")
    assert decoded.dtype == np.uint8 and decoded[0, 0] == 0 and decoded[0, -1] == 255
    # JPEG is lossy: close, not equal
    jpeg = decode_image(cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(), "x.jpg")
    assert np.abs(jpeg.astype(int) - gray).mean() < 4
    path = tmp_path / "file.png"
    path.write_bytes(png(gray))
    np.testing.assert_array_equal(read_image(path), gray)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose valid header claims ``width x height`` (a decompression-bomb shape)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def _gif() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)), "not an image"),
        (png(blob_pair(64)[0])[:300], "corrupt or truncated PNG"),
        (_gif(), "unsupported image format GIF"),
        (_png_header_only(60_000, 60_000), "too large"),  # 3.6 GB if decoded: refused from the header
    ],
    ids=["empty", "random-bytes", "truncated-png", "gif", "huge-header"],
)
def test_decode_refuses_bad_inputs_with_a_reason_naming_the_file(data: bytes, reason: str):
    with pytest.raises(InputImageError, match=reason) as caught:
        decode_image(data, "scan-7.png")
    assert str(caught.value).startswith("scan-7.png: ")


def test_decode_pixel_limit_is_configurable():
    image = png(np.zeros((100, 100), np.uint8))
    assert decode_image(image, "ok", max_pixels=10_000).shape == (100, 100)
    with pytest.raises(InputImageError, match="too large"):
        decode_image(image, "big", max_pixels=9_999)


# --- Predictor --------------------------------------------------------------------------------


def test_predictions_come_back_at_each_images_original_size(predictor: Predictor):
    shapes = [(32, 32), (48, 80), (100, 100), (20, 27)]
    pairs = [blob_pair(max(shape), seed=index, radius=max(shape) // 5) for index, shape in enumerate(shapes)]
    images = [cv2.resize(image, shape[::-1], interpolation=cv2.INTER_NEAREST) for (image, _), shape in zip(pairs, shapes)]
    truths = [cv2.resize(mask, shape[::-1], interpolation=cv2.INTER_NEAREST) for (_, mask), shape in zip(pairs, shapes)]
    results = predictor.predict(images)
    assert predictor.input_size == 32 and len(results) == 4
    for result, image, truth in zip(results, images, truths):
        assert result.mask.shape == result.probability.shape == image.shape
        assert result.mask.dtype == np.uint8 and set(np.unique(result.mask)) <= {0, 255}
        assert result.probability.dtype == np.float32 and 0.0 <= result.probability.min() <= result.probability.max() <= 1.0
        assert dice(truth > 0, result.mask > 0) > 0.75  # it finds the disc, at the image's own size
        tumour = result.mask > 0
        assert result.tumour_present and result.area_px == int(tumour.sum())
        assert result.area_pct == pytest.approx(100.0 * tumour.sum() / tumour.size)
        assert result.mean_confidence == pytest.approx(float(result.probability[tumour].mean()), abs=1e-6)
        assert 0.5 < result.mean_confidence <= 1.0


def test_no_tumour_gives_an_empty_mask_and_zero_confidence(predictor: Predictor):
    (result,) = predictor.predict([np.full((50, 60), 40, np.uint8)])
    assert not result.tumour_present and result.area_px == 0 and result.area_pct == 0.0
    assert result.mean_confidence == 0.0 and not result.mask.any()


def test_threshold_and_batch_size(model_path: Path):
    images = [blob_pair(32, seed=s)[0] for s in range(5)]
    one = Predictor.load(str(model_path), batch_size=1).predict(images)
    many = Predictor.load(str(model_path), batch_size=4).predict(images)
    strict = Predictor.load(str(model_path), threshold=0.9).predict(images)
    for a, b, c in zip(one, many, strict):
        np.testing.assert_allclose(a.probability, b.probability, atol=1e-6)
        np.testing.assert_array_equal(c.mask, np.where(a.probability > 0.9, 255, 0))
        assert c.area_px < a.area_px
    with pytest.raises(ValueError, match="threshold"):
        Predictor.load(str(model_path), threshold=1.5)


@pytest.mark.parametrize("shape", [(32, 32), (45, 70)], ids=["model-size", "resized"])
def test_flip_tta_makes_predictions_flip_equivariant(model_path: Path, shape: tuple[int, int]):
    image = cv2.resize(blob_pair(64, seed=3, radius=12)[0], shape[::-1], interpolation=cv2.INTER_LINEAR)
    mirrored = np.ascontiguousarray(image[:, ::-1])
    plain = Predictor.load(str(model_path))
    a, b = plain.predict([image, mirrored])
    assert np.abs(b.probability - a.probability[:, ::-1]).max() > 0.1  # the model alone is not symmetric
    tta = Predictor.load(str(model_path), tta=True)
    a, b = tta.predict([image, mirrored])
    np.testing.assert_allclose(b.probability, a.probability[:, ::-1], atol=1e-5)
    # the TTA probability is the mean of the plain one and the mirrored-back prediction of the mirror
    p, q = plain.predict([image, mirrored])
    np.testing.assert_allclose(a.probability, (p.probability + q.probability[:, ::-1]) / 2, atol=1e-5)


# --- inputs and output names ------------------------------------------------------------------


def test_inputs_from_folders_and_zips_get_safe_unique_names(tmp_path: Path):
    image = png(blob_pair(32)[0])
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / ".hidden").mkdir(parents=True)
    (tmp_path / "a" / "scan.png").write_bytes(image)
    (tmp_path / "b" / "scan.PNG").write_bytes(image)
    (tmp_path / "b" / ".hidden" / "x.png").write_bytes(image)
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as archive:
        archive.writestr("../../../etc/scan.png", image)
        archive.writestr("dir\\..\\evil name.png", image)
        archive.writestr("readme.md", "x")
    listing = list_inputs([tmp_path / "a", tmp_path / "b", tmp_path / "c.zip", tmp_path / "missing.png"])
    assert [s.display for s in listing.sources] == [
        str(tmp_path / "a" / "scan.png"),
        str(tmp_path / "b" / "scan.PNG"),
        f"{tmp_path / 'c.zip'}:../../../etc/scan.png",
        f"{tmp_path / 'c.zip'}:dir\\..\\evil name.png",
    ]
    assert listing.ignored == 2 and listing.problems == [(str(tmp_path / "missing.png"), "no such file or folder")]
    assert unique_stems(listing.sources) == ["scan", "scan_2", "scan_3", "evil_name"]


# --- the command ------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_command_writes_masks_overlays_and_a_csv(tmp_path: Path, model_path: Path, capsys):
    inputs = tmp_path / "in"
    (inputs / "p1").mkdir(parents=True)
    (inputs / "p2").mkdir()
    big, big_truth = blob_pair(96, seed=5, radius=20)
    small, _ = blob_pair(32, seed=6)
    assert cv2.imwrite(str(inputs / "p1" / "slice.png"), big)
    assert cv2.imwrite(str(inputs / "p2" / "slice.png"), small)
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as archive:
        archive.writestr("../outside.png", png(np.full((40, 40), 30, np.uint8)))
    out = tmp_path / "out"
    code = main(["predict", str(inputs), str(tmp_path / "more.zip"), "--model", str(model_path), "--out", str(out), "--batch-size", "2"])
    assert code == 0, capsys.readouterr().err
    assert "3 image(s) segmented, 2 with a tumour" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["predictions.csv", "slice_mask.png", "slice_overlay.png", "slice_2_mask.png", "slice_2_overlay.png", "outside_mask.png", "outside_overlay.png"]
    )
    assert not (tmp_path / "outside_mask.png").exists()
    mask = cv2.imread(str(out / "slice_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == big.shape and set(np.unique(mask)) == {0, 255}
    assert dice(big_truth > 0, mask > 0) > 0.8
    overlay = cv2.imread(str(out / "slice_overlay.png"), cv2.IMREAD_UNCHANGED)
    assert overlay.shape == (96, 96, 3)
    outline = np.all(overlay == (0, 0, 255), axis=2)  # predictions are outlined in red (BGR)
    assert outline.any() and (mask[outline] > 0).all()  # outline drawn on the mask's boundary
    assert cv2.imread(str(out / "slice_2_mask.png"), cv2.IMREAD_UNCHANGED).shape == (32, 32)
    rows = _read_csv(out / "predictions.csv")
    assert list(rows[0]) == ["file", "tumour_present", "area_px", "area_pct", "mean_confidence", "status", "reason", "mask", "overlay"]
    by_file = {row["file"]: row for row in rows}
    first = by_file[str(inputs / "p1" / "slice.png")]
    assert first["status"] == "ok" and first["tumour_present"] == "True" and int(first["area_px"]) == int((mask > 0).sum())
    assert float(first["area_pct"]) == pytest.approx(100 * (mask > 0).mean(), abs=1e-3)
    assert 0.5 < float(first["mean_confidence"]) <= 1.0 and first["mask"] == "slice_mask.png"
    empty = by_file[f"{tmp_path / 'more.zip'}:../outside.png"]
    assert empty["tumour_present"] == "False" and empty["area_px"] == "0" and empty["mean_confidence"] == "0.0"


def test_predict_command_averages_models_given_twice(tmp_path: Path, model_path: Path, capsys):
    large_path = tmp_path / "bright64.keras"
    brightness_model(64).save(large_path)
    image, truth = blob_pair(96, seed=5, radius=20)
    assert cv2.imwrite(str(tmp_path / "slice.png"), image)
    code = main(["predict", str(tmp_path / "slice.png"), "--model", str(model_path), "--model", str(large_path), "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    mask = cv2.imread(str(tmp_path / "out" / "slice_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (96, 96) and dice(truth > 0, mask > 0) > 0.8


def test_predict_command_skips_bad_inputs_with_reasons_and_exit_codes(tmp_path: Path, model_path: Path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "random.png").write_bytes(bytes(range(256)) * 3)
    (bad / "truncated.png").write_bytes(png(blob_pair(64)[0])[:200])
    (bad / "empty.png").write_bytes(b"")
    (bad / "huge.png").write_bytes(_png_header_only(50_000, 50_000))
    (bad / "anim.gif").write_bytes(_gif())
    good = tmp_path / "good.png"
    assert cv2.imwrite(str(good), blob_pair(32)[0])
    args = ["--model", str(model_path), "--out", str(tmp_path / "out")]

    assert main(["predict", str(bad), str(bad / "anim.gif"), str(good), *args]) == 1
    err = capsys.readouterr().err
    assert "5 of 6 inputs could not be read" in err and "huge.png: image dimensions are too large" in err
    rows = {Path(r["file"]).name: r for r in _read_csv(tmp_path / "out" / "predictions.csv")}
    assert rows["good.png"]["status"] == "ok"
    reasons = {name: row["reason"] for name, row in rows.items() if row["status"] == "failed"}
    assert set(reasons) == {"random.png", "truncated.png", "empty.png", "huge.png", "anim.gif"}
    assert "not an image" in reasons["random.png"] and "truncated" in reasons["truncated.png"]
    assert "empty" in reasons["empty.png"] and "GIF" in reasons["anim.gif"] and "too large" in reasons["huge.png"]
    assert (tmp_path / "out" / "good_mask.png").exists() and not (tmp_path / "out" / "random_mask.png").exists()

    assert main(["predict", str(bad), *args]) == 2
    assert "none of the 4 input(s) could be read" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nothing-here"), *args]) == 2
    (tmp_path / "no-images").mkdir()
    assert main(["predict", str(tmp_path / "no-images"), *args]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["predict", str(good), "--model", str(tmp_path / "missing.keras"), "--out", str(tmp_path / "o")]) == 1
    assert "missing.keras does not exist" in capsys.readouterr().err
