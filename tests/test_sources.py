"""The download stage's sources: local folder and zip, Kaggle failure modes, synthetic labelling."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest

from helpers import blob_pair, write_pair
from tumorseg.data import sources
from tumorseg.data.sources import SourceError, discover_pair_folders, download, read_source_info

DEFAULTS = dict(
    kaggle_dataset="divyaiyer123/brain-tumor-segmentation-with-mask",
    network_timeout_s=2.0,
    local_path=None,
    image_dir="images",
    mask_dir="masks",
    mask_suffix="",
    synthetic_count=12,
    synthetic_size=64,
    seed=1,
    progress=False,
)


def fetch(out: Path, source: str, **kwargs):
    return download(out, source=source, **(DEFAULTS | kwargs))


@pytest.fixture
def offline(monkeypatch):
    """Kaggle unreachable, without touching the network."""
    monkeypatch.setattr(sources, "kaggle_reachable", lambda timeout_s: (False, "gaierror: name not known"))


def kaggle_like_tree(root: Path, count: int = 6) -> Path:
    """A nested archive layout with differently named folders and _mask files."""
    base = root / "Brain Tumor Segmentation" / "data"
    for index in range(1, count + 1):
        image, mask = blob_pair(64, index)
        write_pair(base, f"{index}.png", image, mask)
        (base / "masks" / f"{index}.png").rename(base / "masks" / f"{index}_mask.png")
    (base / "images").rename(base / "Images")
    (base / "masks").rename(base / "Masks")
    return base


def test_local_folder_is_copied_with_a_real_data_record(pair_folder: Path, tmp_path: Path):
    out = tmp_path / "raw"
    info = fetch(out, "local", local_path=str(pair_folder))
    assert info.kind == "real" and info.source == "local" and info.n_images == info.n_masks == 40
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(p.name for p in (pair_folder / "images").iterdir())
    assert read_source_info(out) == info
    # same content -> same hash, whatever the folder
    assert fetch(tmp_path / "raw2", "local", local_path=str(pair_folder)).data_hash == info.data_hash


def test_a_labels_file_beside_the_folders_comes_along(pair_folder: Path, tmp_path: Path):
    """figshare-style labels.csv (file,tumour_type) feeds the evaluate stage's per-class Dice."""
    (pair_folder / "labels.csv").write_text("file,tumour_type\n1.png,glioma\n")
    fetch(tmp_path / "raw", "local", local_path=str(pair_folder))
    assert (tmp_path / "raw" / "labels.csv").read_text() == "file,tumour_type\n1.png,glioma\n"
    assert not (tmp_path / "raw" / "images" / "labels.csv").exists()


def test_local_zip_with_nested_folders_and_mask_suffix(tmp_path: Path):
    base = kaggle_like_tree(tmp_path / "tree")
    archive = tmp_path / "dataset.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in base.rglob("*.png"):
            bundle.write(path, path.relative_to(tmp_path / "tree"))
    info = fetch(tmp_path / "raw", "local", local_path=str(archive), image_dir="Images", mask_dir="Masks", mask_suffix="_mask")
    assert info.n_images == 6 and info.n_masks == 6
    assert (tmp_path / "raw" / "masks" / "3_mask.png").exists()


def test_discovery_finds_image_and_mask_folders_by_name_and_stems(tmp_path: Path):
    base = kaggle_like_tree(tmp_path / "tree")
    (base.parent / "thumbnails").mkdir()
    write_pair(base.parent / "thumbnails", "x.png", *blob_pair(32, 1))
    images, masks = discover_pair_folders(tmp_path / "tree", "images", "masks", "_mask")
    assert (images.name, masks.name) == ("Images", "Masks")


def test_discovery_failure_lists_what_it_saw(tmp_path: Path):
    (tmp_path / "stuff").mkdir()
    write_pair(tmp_path / "x", "a.png", *blob_pair(32, 1))
    (tmp_path / "x" / "images").rename(tmp_path / "x" / "left")
    (tmp_path / "x" / "masks").rename(tmp_path / "x" / "right")
    with pytest.raises(SourceError, match="data.image_dir"):
        discover_pair_folders(tmp_path, "images", "masks", "")


def test_local_without_path_or_with_missing_path_names_the_key(tmp_path: Path):
    with pytest.raises(SourceError, match="data.local_path"):
        fetch(tmp_path / "raw", "local")
    with pytest.raises(SourceError, match="does not exist"):
        fetch(tmp_path / "raw", "local", local_path=str(tmp_path / "nowhere"))
    assert not (tmp_path / "raw").exists()


def test_kaggle_unreachable_fails_fast_with_what_to_set(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sources, "KAGGLE_HOST", ("kaggle.invalid", 443))  # .invalid never resolves
    started = time.monotonic()
    with pytest.raises(SourceError) as error:
        fetch(tmp_path / "raw", "kaggle", network_timeout_s=2.0)
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "KAGGLE_USERNAME" in message and "data.source" in message


def test_kaggle_reachability_probe_gives_up_on_a_silent_host(monkeypatch):
    def hang(*args, **kwargs):  # a resolver that hangs, then fails the way socket does
        time.sleep(30)
        raise TimeoutError("timed out")

    monkeypatch.setattr(sources.socket, "create_connection", hang)
    started = time.monotonic()
    ok, why = sources.kaggle_reachable(0.5)
    assert not ok and "no answer" in why
    assert time.monotonic() - started < 2


def test_kaggle_download_imports_the_discovered_folders(tmp_path: Path, monkeypatch):
    kaggle_like_tree(tmp_path / "cache")
    monkeypatch.setattr(sources, "kaggle_reachable", lambda timeout_s: (True, "reachable"))
    import kagglehub

    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle: str(tmp_path / "cache"))
    info = fetch(tmp_path / "raw", "kaggle", mask_suffix="_mask")
    assert info.kind == "real" and info.source == "kaggle" and info.origin.startswith("kaggle:divyaiyer123/")
    assert info.n_images == 6


def test_kaggle_download_error_is_explained(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sources, "kaggle_reachable", lambda timeout_s: (True, "reachable"))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    import kagglehub

    def refuse(handle):
        raise RuntimeError("401 Unauthorized")

    monkeypatch.setattr(kagglehub, "dataset_download", refuse)
    with pytest.raises(SourceError, match="no Kaggle credentials found.*401"):
        fetch(tmp_path / "raw", "kaggle")


def test_auto_falls_back_to_labelled_synthetic_data_loudly(tmp_path: Path, offline, caplog):
    out = tmp_path / "raw"
    with caplog.at_level("WARNING"):
        info = fetch(out, "auto")
    assert info.source == "synthetic" and info.kind == "synthetic" and info.requested == "auto"
    assert "SYNTHETIC" in info.note
    assert any("SYNTHETIC" in r.message for r in caplog.records)
    record = json.loads((out / "SOURCE.json").read_text())
    assert record["kind"] == "synthetic" and record["n_images"] == 12


def test_synthetic_folder_imported_as_local_stays_labelled_synthetic(tmp_path: Path):
    from tumorseg.cli import main as cli_main

    assert cli_main(["synth", "--out", str(tmp_path / "phantoms"), "--count", "5", "--size", "64", "--seed", "3"]) == 0
    info = fetch(tmp_path / "raw", "local", local_path=str(tmp_path / "phantoms"))
    assert info.kind == "synthetic"


def test_synthetic_download_is_deterministic_per_seed(tmp_path: Path):
    first = fetch(tmp_path / "a", "synthetic", seed=5)
    second = fetch(tmp_path / "b", "synthetic", seed=5)
    third = fetch(tmp_path / "c", "synthetic", seed=6)
    assert first.data_hash == second.data_hash != third.data_hash
