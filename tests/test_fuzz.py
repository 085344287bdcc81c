"""Property / fuzz tests: untrusted files never crash a command.

Hypothesis generates folders that mix good image/mask pairs (also RGBA, 16-bit, names with spaces
and non-ASCII letters) with bad ones (random bytes, truncated PNGs, size mismatches, zero-byte
files). Whatever the mix: no traceback, each bad pair is reported with its reason, every good pair
is processed, and the inputs are byte-for-byte unchanged. The same for ``decode_image`` (the one
gate for user images in ``tumorseg predict`` and the web app) and the predict command.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import blob_pair
from tumorseg.cli import main as cli_main
from tumorseg.io import hash_tree

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# File names: letters (also non-ASCII), digits, spaces, a few punctuation marks; never hidden.
NAME_CHARS = st.characters(categories=("Lu", "Ll", "Lo", "Nd"), max_codepoint=0x2FFF) | st.sampled_from(" -_()")
NAMES = st.text(NAME_CHARS, min_size=1, max_size=16).map(str.strip).filter(lambda n: n and not n.startswith(".") and len(n.encode()) < 120)

GOOD_KINDS = ("plain", "rgba", "bgr", "sixteen_bit", "binary01_mask")
BAD_KINDS = {
    "random_bytes_image": "unreadable",
    "random_bytes_mask": "unreadable",
    "truncated_image": "unreadable",
    "truncated_mask": "unreadable",
    "size_mismatch": "size_mismatch",
    "zero_byte_image": "empty_file",
    "zero_byte_mask": "empty_file",
    "orphan_image": "orphan_image",
}


def png(array: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", array)
    assert ok
    return buffer.tobytes()


def write_case(root: Path, name: str, kind: str, seed: int, data: st.DataObject) -> None:
    """One pair ``name.png`` of the given kind under root/images and root/masks."""
    image, mask = blob_pair(48, seed)
    image_bytes, mask_bytes = png(image), png(mask)
    if kind == "rgba":
        image_bytes = png(cv2.cvtColor(image, cv2.COLOR_GRAY2BGRA))
    elif kind == "bgr":
        image_bytes = png(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    elif kind == "sixteen_bit":
        image_bytes = png(image.astype(np.uint16) * 257)
    elif kind == "binary01_mask":
        mask_bytes = png((mask > 0).astype(np.uint8))
    elif kind == "random_bytes_image":
        image_bytes = data.draw(st.binary(min_size=1, max_size=300).filter(lambda b: b[:4] != b"\x89PNG"), label="random image")
    elif kind == "random_bytes_mask":
        mask_bytes = data.draw(st.binary(min_size=1, max_size=300).filter(lambda b: b[:4] != b"\x89PNG"), label="random mask")
    elif kind == "truncated_image":
        image_bytes = image_bytes[: data.draw(st.integers(1, len(image_bytes) // 2), label="image cut")]
    elif kind == "truncated_mask":
        mask_bytes = mask_bytes[: data.draw(st.integers(1, len(mask_bytes) // 2), label="mask cut")]
    elif kind == "size_mismatch":
        mask_bytes = png(cv2.resize(mask, (48, 32), interpolation=cv2.INTER_NEAREST))
    elif kind == "zero_byte_image":
        image_bytes = b""
    elif kind == "zero_byte_mask":
        mask_bytes = b""
    (root / "images" / f"{name}.png").write_bytes(image_bytes)
    if kind != "orphan_image":
        (root / "masks" / f"{name}.png").write_bytes(mask_bytes)


@contextlib.contextmanager
def captured() -> io.StringIO:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield err
    err.write("\n--stdout--\n" + out.getvalue())


@FAST
@given(
    names=st.lists(NAMES, min_size=2, max_size=9, unique_by=str.casefold),
    data=st.data(),
)
def test_prepare_cli_reports_every_bad_pair_and_keeps_every_good_one(names: list[str], data: st.DataObject):
    kinds = [
        data.draw(st.sampled_from(GOOD_KINDS if index == 0 else GOOD_KINDS + tuple(BAD_KINDS)), label=f"kind of {name!r}")
        for index, name in enumerate(names)
    ]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "in" / "images").mkdir(parents=True)
        (root / "in" / "masks").mkdir()
        for index, (name, kind) in enumerate(zip(names, kinds)):
            write_case(root / "in", name, kind, seed=index, data=data)
        before = hash_tree(root / "in")

        with captured() as err, contextlib.chdir(root):  # no params.yaml here: the documented defaults
            code = cli_main(
                [
                    "prepare",
                    "--images", str(root / "in" / "images"),
                    "--masks", str(root / "in" / "masks"),
                    "--out", str(root / "out"),
                    "--size", "32",
                    "--mask-suffix", "",
                ]  # fmt: skip
            )
        log = err.getvalue()

        assert "Traceback" not in log, log
        assert code == 0, log
        assert hash_tree(root / "in") == before, "prepare changed its inputs"
        report = json.loads((root / "out" / "report.json").read_text(encoding="utf-8"))
        skipped = {Path(item["file"]).stem: item for item in report["skipped"]}
        written = {p.stem for p in (root / "out").glob("*/images/*.png")}
        for name, kind in zip(names, kinds):
            if kind in GOOD_KINDS:
                assert name in written and name not in skipped, (name, kind, skipped.get(name))
            else:
                assert name not in written, (name, kind)
                assert skipped[name]["reason"] == BAD_KINDS[kind], (name, kind, skipped[name])
                assert skipped[name]["detail"], "a skipped pair needs a readable reason"
        assert report["valid_pairs"] == sum(kind in GOOD_KINDS for kind in kinds)


@settings(max_examples=10, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_prepare_cli_with_nothing_valid_exits_2_with_one_line(blobs: list[bytes]):
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "images").mkdir()
        (root / "masks").mkdir()
        for index, blob in enumerate(blobs):
            (root / "images" / f"{index}.png").write_bytes(blob)
            (root / "masks" / f"{index}.png").write_bytes(blob[::-1])
        with captured() as err, contextlib.chdir(root):
            code = cli_main(["prepare", "--images", str(root / "images"), "--masks", str(root / "masks"), "--out", str(root / "out"), "--size", "32"])
        log = err.getvalue()
        assert code == 2 and "Traceback" not in log
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert errors == [next(line for line in log.splitlines() if "no valid image/mask pairs" in line)]
        assert not (root / "out").exists()


# --------------------------------------------------------------------------------------------
# decode_image and tumorseg predict
# --------------------------------------------------------------------------------------------

inference = pytest.importorskip("tumorseg.inference", reason="tumorseg.inference (tumorseg predict) is not in this checkout")

ENCODINGS = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "tiff": ".tif"}


@st.composite
def encoded_images(draw) -> tuple[bytes, np.ndarray, str]:
    """A small random image (gray/BGR/BGRA, 8/16-bit) encoded in a random format."""
    fmt = draw(st.sampled_from(sorted(ENCODINGS)))
    height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    channels = draw(st.sampled_from([1, 3, 4] if fmt in ("png", "tiff", "bmp") else [1, 3]))
    deep = fmt in ("png", "tiff") and draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    array = rng.integers(0, 65536 if deep else 256, (height, width, channels) if channels > 1 else (height, width)).astype(np.uint16 if deep else np.uint8)
    ok, buffer = cv2.imencode(ENCODINGS[fmt], array)
    assume(ok)
    return buffer.tobytes(), array, fmt


def damaged(data: bytes, draw) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "prefix", "header_only"]))
    if how == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if how == "flip":
        position = draw(st.integers(0, len(data) - 1))
        return data[:position] + bytes([data[position] ^ draw(st.integers(1, 255))]) + data[position + 1 :]
    if how == "prefix":
        return draw(st.binary(max_size=16)) + data
    return data[:32]


def decodes_or_refuses(data: bytes, name: str) -> np.ndarray | None:
    """The contract: a uint8 2-D image, or InputImageError naming the input and a reason. Nothing else."""
    try:
        image = inference.decode_image(data, name)
    except inference.InputImageError as exc:
        message = str(exc)
        assert message.startswith(name) and len(message) > len(name) + 3, message
        return None
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 2 and image.size > 0
    return image


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_decode_image_on_random_bytes(data: bytes):
    decodes_or_refuses(data, "random.bin")


@settings(max_examples=150, deadline=None)
@given(encoded_images(), st.data())
def test_decode_image_on_damaged_images(case, data: st.DataObject):
    encoded, _, fmt = case
    decodes_or_refuses(damaged(encoded, data.draw), f"damaged.{fmt}")


@settings(max_examples=60, deadline=None)
@given(encoded_images())
def test_decode_image_reads_every_valid_format_at_its_size(case):
    encoded, array, fmt = case
    image = decodes_or_refuses(encoded, f"valid.{fmt}")
    assert image is not None, f"a valid {fmt} {array.shape} {array.dtype} image was refused"
    assert image.shape == array.shape[:2]
    if fmt in ("png", "bmp", "tiff") and array.ndim == 2 and array.dtype == np.uint8:
        assert np.array_equal(image, array)  # lossless gray 8-bit: exact round trip


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory) -> Path:
    from tumorseg.models import build_model

    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    build_model("unet", (32, 32, 1), base_filters=4, depth=2, use_caspp=False).save(path)
    return path


@pytest.mark.slow
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    good=st.lists(NAMES.filter(lambda n: not n.casefold().startswith("bad")), min_size=1, max_size=3, unique_by=str.casefold),
    bad=st.lists(st.tuples(NAMES, encoded_images()), min_size=1, max_size=3, unique_by=lambda t: t[0].casefold()),
    data=st.data(),
)
def test_predict_cli_on_a_folder_of_good_and_fuzzed_files(tiny_model_file: Path, good: list[str], bad: list, data: st.DataObject):
    bad = [(f"bad {name}", case) for name, case in bad]
    with tempfile.TemporaryDirectory() as scratch:
        folder, out = Path(scratch) / "in", Path(scratch) / "out"
        folder.mkdir()
        for index, name in enumerate(good):
            (folder / f"{name}.png").write_bytes(png(blob_pair(40 + index, index)[0]))
        expected_bad = []
        for name, (encoded, _, _) in bad:
            blob = damaged(encoded, data.draw)
            (folder / f"{name}.png").write_bytes(blob)
            if decodes_or_refuses(blob, name) is None:  # a damage that still decodes is a good file
                expected_bad.append(name)
        before = hash_tree(folder)

        with captured() as err:
            code = cli_main(["predict", str(folder), "--model", str(tiny_model_file), "--out", str(out)])
        log = err.getvalue()

        assert "Traceback" not in log, log
        assert code == (1 if expected_bad else 0), log
        assert hash_tree(folder) == before
        with open(out / "predictions.csv", newline="", encoding="utf-8") as handle:
            rows = {Path(row["file"]).stem: row for row in csv.DictReader(handle)}
        written = sorted(path.name for path in out.iterdir())
        masks = [rows[name]["mask"] for name in good]
        assert len(set(masks)) == len(good)  # no two inputs share an output
        for name, mask_name in zip(good, masks):
            assert rows[name]["status"] == "ok" and mask_name == Path(mask_name).name and (out / mask_name).exists(), rows[name]
            mask = cv2.imdecode(np.frombuffer((out / mask_name).read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
            assert mask.shape == blob_pair(40 + good.index(name), 0)[0].shape  # back at the input's own size
        for name in expected_bad:
            assert rows[name]["status"] == "failed" and rows[name]["reason"] and not rows[name]["mask"], rows[name]
            assert name in log  # listed with its reason on stderr
        # a mask and an overlay for each image that decoded (a damage may leave it readable), and the CSV
        assert len(written) == 2 * (len(good) + len(bad) - len(expected_bad)) + 1, written
