"""Multi-sequence MRI and NIfTI on the model/inference side (issue 22): the input name that carries a
model's sequences, the predictor's refusals, predict on per-sequence folders and NIfTI volumes
(segmentation back on the input's grid), the scan/patient metrics, Grad-CAM panels, the web API's
one-field-per-sequence upload and the ONNX export.

Known-output models are built here with fixed weights (a 1x1 convolution that thresholds one
channel), so a test can say which pixels must come out as tumour.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from tumorseg.errors import ModelLoadError, SequenceMismatch, UsageError
from tumorseg.evaluation import LabelledImages, evaluate_split, patient_metrics, scan_metrics
from tumorseg.inference import KerasBackend, PostProcessing, PredictedSplit, Predictor, list_inputs, list_scan_inputs, load_backend, predict_files
from tumorseg.models.inputs import input_name, sequences_in

SEQS = ("t1", "flair", "t1ce")


# --------------------------------------------------------------------------------------------
# Helpers (this file's own: tests/helpers.py is shared)
# --------------------------------------------------------------------------------------------


def channel_model(sequences=SEQS, size: int = 32, channel: int = 0, level: float = 128.0, hidden: bool = False):
    """A fixed-weight model: p = sigmoid((x[..., channel] - level) / 8), i.e. tumour exactly where
    that channel is brighter than ``level`` (255 -> p ~ 1, 0 -> p ~ 0). ``sequences=()``: a grayscale
    model named ``image``. ``hidden``: a linear conv + sigmoid activation (a feature map for Grad-CAM)."""
    import keras

    channels = max(1, len(sequences))
    inputs = keras.Input((size, size, channels), name=input_name(sequences))
    kernel = np.zeros((1, 1, channels, 1), np.float32)
    kernel[0, 0, channel, 0] = 1.0 / 8.0
    bias = np.array([-level / 8.0], np.float32)
    if hidden:
        conv = keras.layers.Conv2D(1, 1, name="feature")
        outputs = keras.layers.Activation("sigmoid", name="mask")(conv(inputs))
    else:
        conv = keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")
        outputs = conv(inputs)
    model = keras.Model(inputs, outputs)
    conv.set_weights([kernel, bias])
    return model


def tiny_unet(sequences=SEQS, size: int = 32):
    from tumorseg.models import build_model

    return build_model("unet", (size, size, max(1, len(sequences))), sequences=sequences, base_filters=4, depth=2, use_hac=False, use_caspp=False)


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


# --------------------------------------------------------------------------------------------
# 1. Models: the input name carries the sequences
# --------------------------------------------------------------------------------------------


def test_input_name_round_trips_through_its_parser_and_converter_names():
    assert input_name(SEQS) == "image__t1__flair__t1ce"
    assert input_name(()) == "image"
    assert sequences_in(input_name(SEQS)) == SEQS
    assert sequences_in("serving_default_image__t1__flair:0") == ("t1", "flair")  # TFLite's derived name
    assert sequences_in("image:0") == ()
    assert sequences_in("image") == ()


def test_sequence_names_survive_save_and_plain_keras_load(tmp_path: Path):
    import keras

    model = tiny_unet()
    assert model.inputs[0].name == "image__t1__flair__t1ce"
    path = tmp_path / "seq.keras"
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    assert loaded.inputs[0].name == "image__t1__flair__t1ce"
    assert sequences_in(loaded.inputs[0].name) == SEQS
    predictor = Predictor.load(path)
    assert predictor.sequences == SEQS and predictor.channels == 3
    # a grayscale model keeps the plain name and reads as "no sequences"
    gray = tiny_unet(())
    assert gray.inputs[0].name == "image"
    assert Predictor(gray).sequences == () and Predictor(gray).channels == 1


def test_a_sequence_count_that_is_not_the_channel_count_is_refused():
    from tumorseg.models import build_model

    with pytest.raises(ValueError, match=r"2 sequences \(t1, flair\) for 3 input channel"):
        build_model("unet", (32, 32, 3), sequences=("t1", "flair"), base_filters=4, depth=2, use_hac=False, use_caspp=False)


@pytest.mark.parametrize("channels", [2, 4])
def test_umobilenetv2_takes_any_number_of_sequences(channels: int):
    from tumorseg.models import build_model

    sequences = ("t1", "flair", "t1ce", "t2")[:channels]
    model = build_model("umobilenetv2", (64, 64, channels), sequences=sequences, encoder_weights="none", decoder_filters=[8, 8, 8, 8, 8])
    assert model.inputs[0].name == input_name(sequences)
    mix = model.get_layer("sequences_to_rgb")  # C planes -> the encoder's 3, starting as their mean
    kernel = mix.get_weights()[0]
    assert kernel.shape == (1, 1, channels, 3)
    np.testing.assert_allclose(kernel, 1.0 / channels)
    rng = np.random.default_rng(0)
    probabilities = Predictor(model).probability_maps([rng.integers(0, 256, (48, 80, channels), dtype=np.uint8)])
    assert probabilities[0].shape == (48, 80)
    assert np.isfinite(probabilities[0]).all() and 0.0 <= probabilities[0].min() <= probabilities[0].max() <= 1.0


# --------------------------------------------------------------------------------------------
# 2. Back-ends and the predictor
# --------------------------------------------------------------------------------------------


def test_a_backend_refuses_an_input_name_that_disagrees_with_its_channels():
    import keras

    def model(name: str, channels: int):
        inputs = keras.Input((32, 32, channels), name=name)
        return keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs))

    with pytest.raises(ModelLoadError, match=r"names 2 sequences \(t1, flair\) but has 3 channels"):
        KerasBackend(model("image__t1__flair", 3))
    with pytest.raises(ModelLoadError, match="3 channels but does not name their MRI sequences"):
        KerasBackend(model("image", 3))
    assert KerasBackend(model("image__t1__flair", 2)).sequences == ("t1", "flair")


def test_a_single_image_for_a_multi_sequence_model_names_the_sequences_it_takes():
    predictor = Predictor(channel_model())
    with pytest.raises(SequenceMismatch, match=r"3 sequences \(t1, flair, t1ce\).*got a single image") as caught:
        predictor.predict([np.zeros((32, 32), np.uint8)])
    assert isinstance(caught.value, UsageError)
    with pytest.raises(SequenceMismatch, match="t1, flair, t1ce"):
        predictor.as_input(np.zeros((32, 32, 2), np.uint8))  # two planes for three sequences
    # a float stack is converted plane by plane to uint8
    converted = predictor.as_input(np.dstack([np.full((8, 8), v, np.float32) for v in (0.0, 0.5, 1.0)]))
    assert converted.dtype == np.uint8 and converted.shape == (8, 8, 3)


def test_an_ensemble_of_models_with_different_inputs_is_refused():
    with pytest.raises(ValueError, match="same input.*one grayscale image.*t1, flair, t1ce|same input.*t1, flair, t1ce.*one grayscale image"):
        Predictor([channel_model(()), channel_model(SEQS)])
    with pytest.raises(ValueError, match="same input"):
        Predictor([channel_model(("t1", "flair", "t1ce")), channel_model(("flair", "t1", "t1ce"))])  # same count, other order
    assert Predictor([channel_model(), channel_model(level=100.0)]).sequences == SEQS


def test_a_non_square_stack_gives_a_map_of_its_own_size_from_the_right_channel():
    predictor = Predictor(channel_model(channel=1))  # tumour where flair is bright
    stack = np.zeros((40, 56, 3), np.uint8)
    stack[5:25, 8:30, 1] = 255  # flair: a rectangle
    stack[20:38, 35:54, 0] = 255  # t1 elsewhere: must not count
    stack[20:38, 35:54, 2] = 255  # t1ce too
    (probability,) = predictor.probability_maps([stack])
    assert probability.shape == (40, 56)
    (prediction,) = predictor.predict([stack])
    assert prediction.mask.shape == (40, 56)
    assert prediction.mask[15, 19] == 255  # inside the flair rectangle
    assert not prediction.mask[25:, 35:].any()  # the other channels' block is not tumour
    assert abs(prediction.area_px - 20 * 22) <= 0.25 * 20 * 22  # resized to 32 and back: about the rectangle


# --------------------------------------------------------------------------------------------
# 3. predict on a per-sequence folder
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sequence_root(tmp_path_factory) -> Path:
    """40 slices (5 cases of 8) of 32 px phantoms; case005 lacks t1ce."""
    from tumorseg.data.synthetic import write_sequence_dataset

    root = tmp_path_factory.mktemp("sequences") / "slices"
    write_sequence_dataset(root, 40, 32, 0, SEQS, progress=False)
    return root


def test_per_sequence_folder_listing_pairs_the_planes_by_slice_name(sequence_root: Path):
    listing = list_inputs([sequence_root], SEQS)
    assert listing.count == 40 and not listing.problems and not listing.sources
    by_name = {item.name: item for item in listing.slices}
    complete = by_name["case001_02"]
    assert [p.parent.name for p in complete.files] == list(SEQS)  # the model's order
    assert by_name["case005_03"].files[2] is None and by_name["case005_03"].files[0] is not None


def test_predict_skips_slices_without_a_sequence_and_fills_them_when_asked(sequence_root: Path, tmp_path: Path):
    predictor = Predictor(channel_model(channel=2, level=32.0))  # tumour where t1ce is brighter than 32
    skipped = predict_files(predictor, [sequence_root], tmp_path / "skip", missing_sequences="skip", progress=False)
    rows = read_csv(skipped.csv_path)
    assert len(rows) == 40
    failed = {Path(row["file"]).name: row for row in rows if row["status"] != "ok"}
    assert sorted(failed) == [f"case005_{i:02d}" for i in range(1, 9)]
    assert all(row["status"] == "failed" and "no t1ce file" in row["reason"] and row["mask"] == "" for row in failed.values())
    for row in rows:
        if row["status"] == "ok":
            mask = cv2.imread(str(tmp_path / "skip" / row["mask"]), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
            assert (tmp_path / "skip" / row["overlay"]).is_file()
    assert not (tmp_path / "skip" / "case005_01_mask.png").exists()

    filled = predict_files(predictor, [sequence_root], tmp_path / "fill", missing_sequences="fill", progress=False)
    rows = read_csv(filled.csv_path)
    assert len(rows) == 40 and all(row["status"] == "ok" for row in rows)
    masks = {Path(row["file"]).name: cv2.imread(str(tmp_path / "fill" / row["mask"]), cv2.IMREAD_GRAYSCALE) for row in rows}
    # the missing t1ce plane is zeros: a model looking only at t1ce finds nothing there, and something elsewhere
    assert all(not masks[f"case005_{i:02d}"].any() for i in range(1, 9))
    assert sum(bool(masks[f"case001_{i:02d}"].any()) for i in range(1, 9)) >= 4
    # the masks of complete slices are the same under both policies
    np.testing.assert_array_equal(masks["case001_04"], cv2.imread(str(tmp_path / "skip" / "case001_04_mask.png"), cv2.IMREAD_GRAYSCALE))


def test_slices_whose_sequences_differ_in_size_are_refused_naming_them(tmp_path: Path):
    root = tmp_path / "in"
    for sequence, shape in zip(SEQS, [(32, 32), (40, 48), (32, 32)]):
        (root / sequence).mkdir(parents=True)
        cv2.imwrite(str(root / sequence / "odd.png"), np.full(shape, 90, np.uint8))
        cv2.imwrite(str(root / sequence / "good.png"), np.full((32, 32), 90, np.uint8))
    report = predict_files(Predictor(channel_model()), [root], tmp_path / "out", progress=False)
    status = {Path(row["file"]).name: row for row in report.rows}
    assert status["good"]["status"] == "ok"
    assert status["odd"]["status"] == "failed" and "flair is 48x40" in status["odd"]["reason"] and "32x32" in status["odd"]["reason"]


def test_predict_command_on_a_sequence_folder(sequence_root: Path, tmp_path: Path, capsys):
    from tumorseg.cli import main

    model_path = tmp_path / "channel.keras"
    channel_model(channel=2, level=32.0).save(model_path)
    args = ["predict", str(sequence_root), "--model", str(model_path), "--batch-size", "16"]
    assert main([*args, "--out", str(tmp_path / "skip")]) == 1  # some slices skipped: exit 1, the rest written
    err = capsys.readouterr().err
    assert "case005_01" in err and "no t1ce file" in err and "--missing-sequences fill" in err
    assert len(list((tmp_path / "skip").glob("*_mask.png"))) == 32
    assert main([*args, "--out", str(tmp_path / "fill"), "--missing-sequences", "fill"]) == 0
    assert len(list((tmp_path / "fill").glob("*_mask.png"))) == 40
    assert "40 image(s) segmented" in capsys.readouterr().out


def test_predict_command_refuses_a_plain_image_for_a_multi_sequence_model(tmp_path: Path, capsys):
    from tumorseg.cli import main

    model_path = tmp_path / "channel.keras"
    channel_model().save(model_path)
    cv2.imwrite(str(tmp_path / "slice.png"), np.zeros((32, 32), np.uint8))
    code = main(["predict", str(tmp_path / "slice.png"), "--model", str(model_path), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "t1, flair, t1ce" in err and "slice.png" in err


# --------------------------------------------------------------------------------------------
# 4. predict on NIfTI volumes
# --------------------------------------------------------------------------------------------


def test_nifti_cases_get_a_segmentation_on_their_own_grid(tmp_path: Path):
    import nibabel as nib

    from tumorseg.data.synthetic import write_sequence_volumes

    volumes = tmp_path / "volumes"
    write_sequence_volumes(volumes, 16, 32, 0, SEQS, progress=False)  # case001, case002
    (volumes / "case002_t1ce.nii.gz").unlink()
    listing = list_scan_inputs([volumes], SEQS)
    assert [v.case for v in listing.volumes] == ["case001", "case002"] and listing.ignored == 2  # the two _seg files
    predictor = Predictor(tiny_unet())
    report = predict_files(predictor, [volumes], tmp_path / "out", progress=False)
    status = {Path(row["file"]).name: row for row in report.rows}
    assert status["case001"]["status"] == "ok" and status["case001"]["mask"] == "case001_seg.nii.gz"
    assert status["case002"]["status"] == "failed" and "no t1ce volume" in status["case002"]["reason"]
    source = nib.load(str(volumes / "case001_t1.nii.gz"))
    seg = nib.load(str(tmp_path / "out" / "case001_seg.nii.gz"))
    assert seg.shape == source.shape == (32, 32, 8)
    np.testing.assert_allclose(seg.affine, source.affine)
    assert seg.get_data_dtype() == np.uint8
    values = np.asarray(seg.dataobj)
    assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1}
    assert (tmp_path / "out" / "case001_overlay.png").is_file()

    filled = predict_files(predictor, [volumes], tmp_path / "filled", missing_sequences="fill", progress=False)
    assert all(row["status"] == "ok" for row in filled.rows)
    assert nib.load(str(tmp_path / "filled" / "case002_seg.nii.gz")).shape == (32, 32, 8)


# Voxel axis 0 runs anterior, axis 1 superior, axis 2 to the right: a permuted and flipped grid,
# which predict turns to (posterior, left, superior) slices and back.
TURNED_AFFINE = np.array([[0.0, 0.0, 2.0, 10.0], [1.5, 0.0, 0.0, -5.0], [0.0, 3.0, 0.0, 7.0], [0.0, 0.0, 0.0, 1.0]])


def test_a_segmentation_lands_on_the_right_voxels_of_a_turned_volume(tmp_path: Path):
    import nibabel as nib
    from nibabel.orientations import aff2axcodes

    assert aff2axcodes(TURNED_AFFINE) == ("A", "S", "R")
    shape = (32, 5, 32)  # the slices are along axis 1: in-plane 32 x 32, the model's size (no resizing)
    t1 = np.full(shape, 100, np.int16)
    flair = np.full(shape, 100, np.int16)
    t1[20:30, 0:5, 2:12] = 1000  # t1 is bright elsewhere: the model must not look at it
    flair[3:10, 1:3, 20:29] = 1000  # an off-centre block on two of the five slices
    flair[25, 4, 4] = 1000  # and one lone voxel
    inputs = tmp_path / "in"
    inputs.mkdir()
    nifti(inputs / "p1_t1.nii.gz", t1, TURNED_AFFINE)
    nifti(inputs / "p1_flair.nii.gz", flair, TURNED_AFFINE)
    predictor = Predictor(channel_model(("t1", "flair"), channel=1))
    report = predict_files(predictor, [inputs], tmp_path / "out", progress=False)
    assert [row["status"] for row in report.rows] == ["ok"]
    seg = nib.load(str(tmp_path / "out" / "p1_seg.nii.gz"))
    assert seg.shape == shape
    np.testing.assert_allclose(seg.affine, TURNED_AFFINE)
    np.testing.assert_array_equal(np.asarray(seg.dataobj), (flair == 1000).astype(np.uint8))
    assert int(report.rows[0]["area_px"]) == int((flair == 1000).sum())


def test_a_grayscale_model_segments_a_nifti_volume_voxel_for_voxel(tmp_path: Path):
    import nibabel as nib

    data = np.full((32, 32, 4), 50.0, np.float32)
    data[4:9, 20:31, 1] = 900.0
    data[0, 0, 3] = 900.0
    path = nifti(tmp_path / "brain.nii.gz", data, TURNED_AFFINE[[0, 2, 1, 3]])  # another turn: A, R, S
    listing = list_inputs([path])
    assert [v.case for v in listing.volumes] == ["brain"] and not listing.sources
    report = predict_files(Predictor(channel_model(())), [path], tmp_path / "out", progress=False)
    assert report.rows[0]["status"] == "ok" and report.rows[0]["mask"] == "brain_seg.nii.gz"
    seg = nib.load(str(tmp_path / "out" / "brain_seg.nii.gz"))
    np.testing.assert_allclose(seg.affine, TURNED_AFFINE[[0, 2, 1, 3]])
    np.testing.assert_array_equal(np.asarray(seg.dataobj), (data == 900.0).astype(np.uint8))


def test_nifti_listing_reports_names_it_cannot_place(tmp_path: Path):
    affine = np.eye(4)
    nifti(tmp_path / "a_t1.nii.gz", np.ones((4, 4, 2), np.float32), affine)
    nifti(tmp_path / "a_t2.nii.gz", np.ones((4, 4, 2), np.float32), affine)  # not a sequence of the model
    nifti(tmp_path / "noseq.nii.gz", np.ones((4, 4, 2), np.float32), affine)  # no _<sequence> tag
    listing = list_scan_inputs([tmp_path], ("t1", "flair"))
    assert [(v.case, v.files[1]) for v in listing.volumes] == [("a", None)]
    assert listing.ignored == 1
    assert [Path(p).name for p, _ in listing.problems] == ["noseq.nii.gz"]
    assert "<case>_<sequence>.nii.gz" in listing.problems[0][1]


# --------------------------------------------------------------------------------------------
# 5. Evaluation on scans: tumour-free slices and patients
# --------------------------------------------------------------------------------------------


def _mask(cells: list[tuple[int, int]] = (), shape=(8, 8)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for row, col in cells:
        mask[row, col] = True
    return mask


def test_scan_metrics_count_false_positive_and_detected_slices():
    truths = [_mask([(1, 1), (1, 2)]), _mask([(5, 5)]), _mask(), _mask(), _mask()]
    masks = [_mask([(1, 2), (6, 6)]), _mask([(0, 0)]), _mask([(3, 3)]), _mask(), _mask()]
    metrics = scan_metrics(truths, masks)
    assert metrics == {"n_tumour_slices": 2, "n_tumour_free_slices": 3, "false_positive_rate": pytest.approx(1 / 3), "detection_sensitivity": 0.5}
    assert scan_metrics(truths[:2], masks[:2])["false_positive_rate"] is None


def test_patient_dice_pools_each_patients_slices():
    truths = [_mask([(0, 0), (0, 1), (0, 2), (0, 3)]), _mask(), _mask([(4, 4)]), _mask()]
    masks = [_mask([(0, 0), (0, 1)]), _mask([(7, 7), (7, 6)]), _mask(), _mask()]
    metrics = patient_metrics(truths, masks, ["a", "a", "b", "c"])
    # a: TP 2, FP 2, FN 2 -> 4 / 8; b: TP 0, FN 1 -> 0; c: nothing anywhere -> 1
    assert metrics["patient_dice_by_patient"] == {"a": 0.5, "b": 0.0, "c": 1.0}
    assert metrics["patient_dice"] == pytest.approx(0.5) and metrics["n_patients"] == 3


def _fake_predict(maps: list[np.ndarray]):
    def predict(split: LabelledImages) -> PredictedSplit:
        return PredictedSplit(list(split.names), [m.astype(np.float32) for m in maps], 1.0)

    return predict


def test_evaluate_split_scores_tumour_slices_and_reports_scan_and_patient_metrics():
    size = 16
    truths, maps = [], []

    def square(r0, r1, c0, c1):
        mask = np.zeros((size, size), bool)
        mask[r0:r1, c0:c1] = True
        return mask

    # tumour slices: a perfect one, a half-found one (Dice 2*8/(8+16) = 2/3), a missed one (Dice 0)
    truths += [square(2, 6, 2, 6), square(8, 12, 8, 12), square(1, 3, 10, 14)]
    maps += [square(2, 6, 2, 6) * 0.9, square(8, 10, 8, 12) * 0.9, square(12, 14, 0, 4) * 0.9]
    # tumour-free slices: clean, a 1-pixel speck (dropped by the blob filter), a 3x3 false positive
    truths += [np.zeros((size, size), bool)] * 3
    speck = np.zeros((size, size), np.float32)
    speck[5, 5] = 0.9
    maps += [np.zeros((size, size), np.float32), speck, square(0, 3, 0, 3) * 0.9]
    names = [f"s{i}.png" for i in range(6)]
    images = [np.zeros((size, size, 3), np.uint8) for _ in names]
    patients = ["p1", "p1", "p2", "p2", "p1", "p3"]
    split = LabelledImages("test", names, images, truths, "prepared", patients)

    evaluation = evaluate_split(_fake_predict(maps), split, post=PostProcessing(0.5, 2))
    metrics = evaluation.metrics
    assert metrics["dice"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)  # tumour slices only
    assert metrics["n_images"] == 6
    assert metrics["n_tumour_slices"] == 3 and metrics["n_tumour_free_slices"] == 3
    assert metrics["false_positive_rate"] == pytest.approx(1 / 3)  # the speck is filtered out
    assert metrics["detection_sensitivity"] == pytest.approx(2 / 3)
    assert "tumour slices" in metrics["aggregation"]
    # p1: slices 0, 1, 4 -> TP 16+8, FP 0, FN 8 -> 48/56; p2: slices 2, 3 -> TP 0, FP 8, FN 8 -> 0; p3: FP 9 -> 0
    assert metrics["patient_dice_by_patient"] == pytest.approx({"p1": 48 / 56, "p2": 0.0, "p3": 0.0})
    assert metrics["patient_dice"] == pytest.approx(48 / 56 / 3)
    assert list(evaluation.per_image["patient"]) == patients
    assert len(evaluation.per_image) == 6

    # only tumour slices and no patients: no scan or patient metrics, the headline over all slices
    plain = LabelledImages("test", names[:3], images[:3], truths[:3], "prepared")
    metrics = evaluate_split(_fake_predict(maps[:3]), plain, post=PostProcessing(0.5, 2)).metrics
    assert metrics["dice"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert not {"false_positive_rate", "detection_sensitivity", "patient_dice", "n_tumour_free_slices"} & set(metrics)


# --------------------------------------------------------------------------------------------
# 6. Grad-CAM and the explanation panel
# --------------------------------------------------------------------------------------------


def test_a_multi_sequence_panel_has_a_tile_per_sequence_and_the_grad_cam():
    from tumorseg.explain import explanation_panel

    planes = [np.full((32, 32), value, np.uint8) for value in (10, 120, 230)]
    stack = np.dstack(planes)
    mask = np.zeros((32, 32), np.uint8)
    heat = np.zeros((32, 32), np.float32)
    gray_panel = explanation_panel(planes[0], mask, heat)
    panel = explanation_panel(stack, mask, heat)
    tile = gray_panel.shape[1] // 2  # 32 px enlarged x8 to 256, framed by 2 px each side
    assert tile == 260 and panel.shape[1] == 4 * tile and panel.shape[0] == gray_panel.shape[0]
    for index, value in enumerate((10, 120, 230)):  # tile k shows sequence k
        assert tuple(panel[100, index * tile + 100]) == (value, value, value)
    labelled = explanation_panel(stack, mask, heat, [*SEQS, "Grad-CAM"])
    assert labelled.shape == (panel.shape[0] + 22, panel.shape[1], 3)  # one caption band


def test_grad_cam_explains_a_non_square_stack():
    from tumorseg.explain import GradCam

    explainer = GradCam(tiny_unet())
    assert explainer.sequences == SEQS
    rng = np.random.default_rng(1)
    heat = explainer(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    assert heat.shape == (40, 48) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and 0.0 <= heat.min() and heat.max() <= 1.0
    with pytest.raises(SequenceMismatch, match="t1, flair, t1ce"):
        explainer(np.zeros((40, 48), np.uint8))


# --------------------------------------------------------------------------------------------
# 7. The web API
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sequence_client():
    from fastapi.testclient import TestClient

    from tumorseg.serve import create_app

    app = create_app(Predictor(channel_model(channel=1, hidden=True)))  # tumour where flair is bright
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _uploads(shapes=((40, 48),) * 3, skip: str | None = None) -> dict:
    files = {}
    for sequence, shape in zip(SEQS, shapes):
        plane = np.full(shape, 40, np.uint8)
        if sequence == "flair":
            plane[10:30, 6:20] = 255
        if sequence != skip:
            files[sequence] = (f"{sequence}.png", png(plane), "image/png")
    return files


def test_health_lists_the_sequences(sequence_client):
    body = sequence_client.get("/health").json()
    assert body["sequences"] == list(SEQS)
    assert body["input_size"] == 32


def test_an_upload_with_every_sequence_is_segmented_at_its_own_size(sequence_client):
    response = sequence_client.post("/predict", files=_uploads())
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (48, 40)
    assert body["filename"] == "t1.png" and body["tumour_present"] is True
    assert abs(body["area_px"] - 20 * 14) <= 0.3 * 20 * 14
    import base64

    mask = cv2.imdecode(np.frombuffer(base64.b64decode(body["mask_png"]), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (40, 48) and mask[20, 13] == 255 and not mask[:, 30:].any()
    assert body["gradcam_png"] is not None


def test_a_missing_sequence_field_is_named(sequence_client):
    response = sequence_client.post("/predict", files=_uploads(skip="flair"))
    assert response.status_code == 422
    assert "'flair'" in response.json()["detail"]
    # the grayscale field name is no substitute
    response = sequence_client.post("/predict", files={"file": ("a.png", png(np.zeros((32, 32), np.uint8)), "image/png")})
    assert response.status_code == 422 and "'t1'" in response.json()["detail"]


def test_sequences_of_different_sizes_are_refused(sequence_client):
    response = sequence_client.post("/predict", files=_uploads(shapes=((40, 48), (40, 48), (32, 32))))
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "t1ce" in detail and "32x32" in detail and "48x40" in detail


# --------------------------------------------------------------------------------------------
# 8. Export
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_onnx_export_keeps_the_sequences(tmp_path: Path):
    from tumorseg.export import export_model

    source = tmp_path / "seq.keras"
    tiny_unet().save(source)
    out = tmp_path / "seq.onnx"
    result = export_model(str(source), "onnx", out, sample_count=2, timing_repeats=1)
    assert result.passed and out.is_file()
    assert result.check["sequences"] == list(SEQS)
    backend = load_backend(out)
    assert backend.name == "onnx" and backend.sequences == SEQS
    predictor = Predictor.load(out)
    assert predictor.sequences == SEQS
    assert predictor.predict([np.zeros((40, 48, 3), np.uint8)])[0].mask.shape == (40, 48)
    with pytest.raises(SequenceMismatch):
        predictor.predict([np.zeros((40, 48), np.uint8)])
