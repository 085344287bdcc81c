"""Issue 20, trustworthy outputs: a broken params file, option value or model file is refused with
one short line that names the file and the key; nothing is coerced, defaulted or left untraceable."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from helpers import PROJECT_ROOT, blob_pair, write_pair
from tumorseg.cli import main as cli_main
from tumorseg.config import MAX_ERROR_CHARS, Config, ConfigError, check_image_size, config_from_dict, load_config, one_line
from tumorseg.data.prepare import assign_splits
from tumorseg.data.sources import SOURCE_FILE, write_synthetic_source
from tumorseg.inference import ModelLoadError, open_keras_model

PARAMS = PROJECT_ROOT / "params.yaml"


def raw_params() -> dict:
    return yaml.safe_load(PARAMS.read_text())


def with_value(raw: dict, dotted: str, value) -> dict:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return raw


def params_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_line(err: str) -> str:
    """The one ``error:`` line of a command's stderr: short, and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[:2000]
    assert len(lines[0]) <= MAX_ERROR_CHARS, lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# Types: no coercion
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, said",
    [
        ("epochs", True, "true (a boolean)"),
        ("epochs", "5", "'5' (a string"),
        ("batch_size", 8.0, "an integer"),
        ("lr", "0.001", "'0.001' (a string"),
        ("models.unet.use_hac", "yes", "'yes' (a string)"),
        ("train.deterministic", 1, "true or false"),
        ("prepare.workers", False, "false (a boolean)"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_not_coerced(key: str, value, said: str):
    with pytest.raises(ConfigError) as error:
        config_from_dict(with_value(raw_params(), key, value))
    assert f"`{key}`" in str(error.value) and said in str(error.value)


def test_an_integer_is_a_number_and_1e_4_is_a_float_but_a_quoted_number_is_text(tmp_path: Path):
    text = PARAMS.read_text()
    cfg = load_config(params_file(tmp_path, text.replace("lr: 1.0e-4", "lr: 1e-4").replace("min_lr: 1.0e-6", "min_lr: 1e-6")))
    assert (cfg.lr, cfg.train.min_lr) == (1e-4, 1e-6)  # PyYAML alone reads both as strings
    assert load_config(params_file(tmp_path, text.replace("lr: 1.0e-4", "lr: 1"))).lr == 1.0
    with pytest.raises(ConfigError, match="`lr`"):
        load_config(params_file(tmp_path, text.replace("lr: 1.0e-4", 'lr: "1e-4"')))


# --------------------------------------------------------------------------------------------
# Structure: duplicates, empty files, missing sections, alias bombs
# --------------------------------------------------------------------------------------------


def test_a_duplicate_key_is_an_error_naming_the_key_and_both_lines(tmp_path: Path):
    text = PARAMS.read_text()
    first = text.splitlines().index("epochs: 30") + 1
    path = params_file(tmp_path, text.replace("seed: 42\n", "seed: 42\nepochs: 5\n", 1))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: `epochs`: duplicate key") and f"first at line {first}" in message


def test_a_duplicate_key_inside_a_flow_mapping_is_found_too(tmp_path: Path):
    text = PARAMS.read_text().replace("rotate: {p: 0.5, limit: 15}", "rotate: {p: 0.5, limit: 15, p: 0.9}")
    with pytest.raises(ConfigError, match="`p`: duplicate key"):
        load_config(params_file(tmp_path, text))


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_an_empty_params_file_is_an_error_not_the_defaults(tmp_path: Path, text: str):
    path = params_file(tmp_path, text)
    with pytest.raises(ConfigError, match=f"^{path}: empty"):
        load_config(path)


@pytest.mark.parametrize("key", [key for key in raw_params() if key not in ("profile", "profiles")])
def test_a_missing_top_level_key_or_section_is_named(key: str):
    raw = raw_params()
    del raw[key]
    with pytest.raises(ConfigError, match=f"missing or empty: `{key}`"):
        config_from_dict(raw)


@pytest.mark.parametrize("dotted", ["models.umobilenetv2", "augment.rotate", "train.init_from"])
def test_a_missing_sub_section_is_named(dotted: str):
    raw = raw_params()
    parent, leaf = dotted.split(".")
    del raw[parent][leaf]
    with pytest.raises(ConfigError, match=f"`{dotted}`"):
        config_from_dict(raw)


def test_an_empty_section_is_named():
    with pytest.raises(ConfigError, match="missing or empty: `pretrain`"):
        config_from_dict(raw_params() | {"pretrain": None})  # `pretrain:` with nothing below it


def alias_bomb(levels: int, key: str) -> str:
    """``levels`` lines of anchors that expand to 10**levels values under ``key``."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\n{key}: *l{levels - 1}\n"


@pytest.mark.parametrize("levels, key", [(6, "lr"), (9, "bomb")])
def test_an_alias_bomb_fails_fast_with_a_short_line(tmp_path: Path, levels: int, key: str):
    path = params_file(tmp_path, PARAMS.read_text() + alias_bomb(levels, key))
    started = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert time.perf_counter() - started < 2.0
    assert "alias" in str(error.value) and len(str(error.value)) <= MAX_ERROR_CHARS


def test_a_recursive_anchor_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="alias to itself"):
        load_config(params_file(tmp_path, PARAMS.read_text() + "loop: &loop [1, *loop]\n"))


# --------------------------------------------------------------------------------------------
# `tumorseg config --params X`: one line, exit code 2
# --------------------------------------------------------------------------------------------


def not_params_files(tmp_path: Path) -> dict[str, Path]:
    png = tmp_path / "slice.png"
    cv2.imwrite(str(png), np.zeros((8, 8), np.uint8))
    binary = tmp_path / "blob.yaml"
    binary.write_bytes(b"lr: 1\0\0\0")
    huge = tmp_path / "huge.yaml"
    huge.write_text("# padding\n" * 200_000)
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [1, 2\nepochs: 3\n")
    return {"folder": tmp_path, "png": png, "nul bytes": binary, "over 1 MB": huge, "bad yaml": broken, "absent": tmp_path / "nope.yaml"}


@pytest.mark.parametrize("kind", ["folder", "png", "nul bytes", "over 1 MB", "bad yaml", "absent"])
def test_config_on_something_that_is_not_a_params_file_says_so_in_one_line(tmp_path: Path, capsys, kind: str):
    path = not_params_files(tmp_path)[kind]
    assert cli_main(["config", "--params", str(path)]) == 2
    captured = capsys.readouterr()
    assert str(path) in error_line(captured.err) and not captured.out


def test_config_into_a_closed_pipe_ends_without_a_traceback():
    """`tumorseg config | head -1`: the reader leaves before the settings are all printed."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tumorseg.cli", "config", "--params", str(PARAMS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    child.stdout.close()  # long before the child has imported enough to print
    stderr = child.stderr.read()
    child.wait(timeout=60)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_many_problems_fit_one_line_with_a_count_of_the_rest(tmp_path: Path, capsys):
    raw = raw_params()
    for key in ("lr", "epochs", "batch_size", "seed", "data.source", "prepare.workers", "loss.smooth", "train.optimizer", "evaluate.threshold"):
        with_value(raw, key, "x" * 500)
    path = params_file(tmp_path, yaml.safe_dump(raw))
    assert cli_main(["config", "--params", str(path)]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {path}: `lr`: must be a number") and "…" in line and line.endswith("more)")


def test_one_line_keeps_the_end_of_a_long_path_and_counts_what_it_leaves_out():
    line = one_line("/" + "deep/" * 100 + "params.yaml", [f"`k{i}`: " + "bad " * 30 for i in range(20)])
    assert len(line) <= MAX_ERROR_CHARS and "\n" not in line
    assert line.startswith("…") and "params.yaml: `k0`" in line and line.endswith("more)")


# --------------------------------------------------------------------------------------------
# Image size: one check for `image_size` and `prepare --size`
# --------------------------------------------------------------------------------------------

BAD_SIZES = [0, -5, 33, 100_000]


@pytest.mark.parametrize("size", BAD_SIZES)
def test_image_size_must_be_a_multiple_of_32_up_to_2048(size: int):
    with pytest.raises(ValueError) as expected:
        check_image_size(size)
    with pytest.raises(ConfigError) as error:
        config_from_dict(raw_params() | {"image_size": size})
    assert f"`image_size`: {expected.value}" in str(error.value)


@pytest.mark.parametrize("size", BAD_SIZES)
def test_prepare_refuses_a_bad_size_before_any_work(tmp_path: Path, capsys, monkeypatch, size: int):
    monkeypatch.chdir(tmp_path)  # no params.yaml: the documented defaults
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()  # empty: were the size used, prepare would fail on "no pairs" instead
    code = cli_main(["prepare", "--images", "images", "--masks", "masks", "--out", "out", "--size", str(size)])
    with pytest.raises(ValueError) as expected:
        check_image_size(size)
    assert code == 2
    assert error_line(capsys.readouterr().err) == f"error: --size {expected.value}"
    assert not (tmp_path / "out").exists()


def small_pair_folder(root: Path, count: int) -> Path:
    for index in range(1, count + 1):
        write_pair(root, f"{index}.png", *blob_pair(32, index))
    return root


def test_prepare_step_takes_size_0_as_an_error_not_as_the_default(tmp_path: Path):
    from tumorseg.pipeline.prepare import prepare_step

    pairs = small_pair_folder(tmp_path / "pairs", 3)
    with pytest.raises(ValueError, match="multiple of 32"):
        prepare_step(Config(), pairs / "images", pairs / "masks", tmp_path / "out", progress=False, size=0)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# prepare: odd outputs and library errors are one line; tiny splits warn; the origin is kept
# --------------------------------------------------------------------------------------------


def test_prepare_into_the_current_folder_is_one_line(tmp_path: Path, capsys, monkeypatch):
    pairs = small_pair_folder(tmp_path / "pairs", 3)
    before = sorted(p.name for p in pairs.rglob("*"))
    monkeypatch.chdir(pairs)
    assert cli_main(["prepare", "--images", "images", "--masks", "masks", "--out", ".", "--size", "32"]) == 2
    assert "output . " in error_line(capsys.readouterr().err)
    assert sorted(p.name for p in pairs.rglob("*")) == before


def test_a_tiny_dataset_split_warns_naming_the_group_counts(caplog):
    def split(count: int) -> tuple[dict[str, int], str]:
        caplog.clear()
        names, areas = [f"case{index}" for index in range(count)], [0.001 * (i + 1) for i in range(count)]
        with caplog.at_level(logging.WARNING, logger="tumorseg.data.prepare"):
            splits, _ = assign_splits(names, areas, group_by="none", n_strata=3, val_fraction=0.15, test_fraction=0.15, seed=42)
        return {name: splits.count(name) for name in ("train", "val", "test")}, " ".join(r.getMessage() for r in caplog.records)

    counts, warning = split(13)
    assert min(counts.values()) < 5
    assert f"train {counts['train']}, val {counts['val']}, test {counts['test']} groups" in warning
    counts, warning = split(100)
    assert min(counts.values()) >= 5 and not warning


def run_prepare(images: Path, masks: Path, out: Path) -> dict:
    assert cli_main(["prepare", "--images", str(images), "--masks", str(masks), "--out", str(out), "--size", "32"]) == 0
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def test_cli_prepare_keeps_the_origin_of_the_data(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml: the documented defaults (group_by block:20)
    info = write_synthetic_source(tmp_path / "phantoms", count=13, size=32, seed=1, progress=False)
    report = run_prepare(tmp_path / "phantoms" / "images", tmp_path / "phantoms" / "masks", tmp_path / "out")
    assert (report["data_source"], report["data_origin"], report["data_hash"]) == (info.kind, info.origin, info.data_hash)
    assert any("small split" in warning and "train 1, val 0, test 0 groups" in warning for warning in report["warnings"])

    plain = tmp_path / "plain"  # the same files without their SOURCE.json
    shutil.copytree(tmp_path / "phantoms", plain, ignore=shutil.ignore_patterns(SOURCE_FILE))
    report = run_prepare(plain / "images", plain / "masks", tmp_path / "out2")
    assert report["data_source"] == "unknown" and report["data_origin"] == str((plain / "images").resolve())
    assert report["data_hash"] == info.data_hash  # the same content hash as the download stage's

    shutil.copy(tmp_path / "phantoms" / SOURCE_FILE, plain / SOURCE_FILE)  # a record that no longer fits
    (plain / "images" / "00001.png").unlink()
    (plain / "masks" / "00001.png").unlink()
    report = run_prepare(plain / "images", plain / "masks", tmp_path / "out3")
    assert report["data_source"] == "unknown" and len(report["data_hash"]) == 64 and report["data_hash"] != info.data_hash


# --------------------------------------------------------------------------------------------
# Corrupt model files: say what is wrong, never "File not found"
# --------------------------------------------------------------------------------------------


def keras_like_zip(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name.replace("__", "."), data)
    return buffer.getvalue()


def corrupt_model(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "model.keras"
    complete = keras_like_zip(config__json=b"{}", metadata__json=b"{}", model__weights__h5=os.urandom(4000))
    if kind == "truncated zip":
        path.write_bytes(complete[: len(complete) // 2])
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(1, 255, 4096, dtype=np.uint8).tobytes())
    elif kind == "png":
        cv2.imwrite(str(tmp_path / "slice.png"), np.zeros((8, 8), np.uint8))
        os.replace(tmp_path / "slice.png", path)
    elif kind == "hdf5":
        import h5py

        with h5py.File(path, "w") as handle:
            handle["numbers"] = [1, 2, 3]
    elif kind == "zip without config":
        path.write_bytes(keras_like_zip(notes__txt=b"hello"))
    elif kind == "zip without weights":
        path.write_bytes(keras_like_zip(config__json=b"{}"))
    elif kind == "empty":
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "kind, said",
    [
        ("truncated zip", "truncated or corrupt zip archive"),
        ("random bytes", "not a Keras model archive (not a zip file)"),
        ("png", "a PNG image, not a Keras model archive"),
        ("hdf5", "an HDF5 (.h5) file, not a Keras model archive"),
        ("zip without config", "no config.json inside"),
        ("zip without weights", "no model.weights.h5 inside"),
        ("empty", "empty file (0 bytes)"),
    ],
)
def test_a_corrupt_keras_file_says_what_is_wrong_with_it(tmp_path: Path, kind: str, said: str):
    path = corrupt_model(tmp_path, kind)
    with pytest.raises(ModelLoadError) as error:
        open_keras_model(path)
    assert str(error.value).startswith(f"{path}: ") and said in str(error.value)
    assert "not found" not in str(error.value).lower()


def test_a_corrupt_model_in_predict_is_one_line(tmp_path: Path, capsys):
    path = corrupt_model(tmp_path, "truncated zip")
    cv2.imwrite(str(tmp_path / "scan.png"), np.zeros((32, 32), np.uint8))
    assert cli_main(["predict", str(tmp_path / "scan.png"), "--model", str(path), "--out", str(tmp_path / "out")]) == 1
    assert "truncated or corrupt zip archive" in error_line(capsys.readouterr().err)
