"""A full disk (ENOSPC) or a read-only file system (EROFS) under the output folder.

The machine that runs the tests is often root, for whom permissions stop nothing, so faults are
injected deterministically instead: Python's file-writing entry points (``open``, ``os.open``,
``os.mkdir``, ``os.replace``, ``os.link``, ...) fail for paths under one folder the way the kernel
would. ENOSPC lets a file be created and fails once a few bytes are in (a partial file exists
until someone cleans it up); EROFS refuses to create, rename, link or remove anything.

Each case checks what the user gets: exit code 1 and one line naming the path and the cause (no
traceback), inputs untouched, no partial or temporary file left, the previous good output intact.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import importlib.util
import io
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from helpers import PROJECT_ROOT, TINY_UNET
from tumorseg.cli import main as cli_main
from tumorseg.io import OUTPUT_MARKER, atomic_write_bytes, hash_tree, sha256_file

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class _FullFile:
    """A real file object whose writes fail with ENOSPC once ``budget`` bytes are written."""

    def __init__(self, handle, budget: int, name: str):
        self._handle, self._budget, self._name = handle, budget, name

    def write(self, data):
        if len(data) > self._budget:
            self._handle.write(data[: self._budget])
            self._handle.flush()
            self._budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._name)
        self._budget -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._handle.close()

    def __iter__(self):
        return iter(self._handle)


@contextlib.contextmanager
def disk_fault(root: Path, code: int, *, match: Callable[[Path], bool] = lambda path: True, budget: int = 64) -> Iterator[list[Path]]:
    """Writes to paths under ``root`` (for which ``match`` is true) fail with ``code``.

    Yields the list of paths that hit the fault, so a test can assert the fault really fired.
    """
    root = Path(os.path.realpath(root))
    real_open, real_os_open = builtins.open, os.open
    real = {name: getattr(os, name) for name in ("mkdir", "replace", "rename", "link", "unlink", "remove", "rmdir")}
    descriptors: dict[int, Path] = {}
    hits: list[Path] = []

    def faulty(path) -> Path | None:
        if isinstance(path, int):
            path = descriptors.get(path)
            if path is None:
                return None
        resolved = Path(os.path.realpath(os.fsdecode(path)))
        if (resolved == root or root in resolved.parents) and match(resolved):
            return resolved
        return None

    def refuse(path: Path):
        hits.append(path)
        raise OSError(code, os.strerror(code), str(path))

    def fake_open(file, mode="r", *args, **kwargs):
        path = faulty(file)
        if path is None or not any(flag in mode for flag in "wax+"):
            return real_open(file, mode, *args, **kwargs)
        if code != errno.ENOSPC:
            refuse(path)
        hits.append(path)
        return _FullFile(real_open(file, mode, *args, **kwargs), budget, str(path))

    def fake_os_open(path, flags, *args, **kwargs):
        target = faulty(path) if flags & WRITE_FLAGS else None
        if target is not None and code != errno.ENOSPC:
            refuse(target)
        fd = real_os_open(path, flags, *args, **kwargs)
        if target is not None:
            descriptors[fd] = target
        return fd

    def guarded(name: str, arity: int):
        def call(*args, **kwargs):
            for path in args[:arity]:
                target = faulty(path)
                if target is not None:
                    refuse(target)
            return real[name](*args, **kwargs)

        return call

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "open", fake_open)
        patch.setattr(io, "open", fake_open)
        patch.setattr(os, "open", fake_os_open)
        if code != errno.ENOSPC:  # a full disk still lets you rename and delete
            for name, arity in (("mkdir", 1), ("replace", 2), ("rename", 2), ("link", 2), ("unlink", 1), ("remove", 1), ("rmdir", 1)):
                patch.setattr(os, name, guarded(name, arity))
        yield hits


FAULTS = [pytest.param(errno.ENOSPC, "No space left on device", id="disk-full"), pytest.param(errno.EROFS, "Read-only file system", id="read-only")]


def hidden_files(folder: Path) -> list[str]:
    """Hidden leftovers (temporary files, staging folders); the marker of a finished output folder is not one."""
    if not folder.exists():
        return []
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.name.startswith(".") and not (p.name == OUTPUT_MARKER and not p.parent.name.startswith("."))
    )


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_injector_fires_for_the_folder_only(monkeypatch, tmp_path: Path):
    inside, outside = tmp_path / "out", tmp_path / "elsewhere"
    with disk_fault(inside, errno.ENOSPC, budget=4) as hits:
        with pytest.raises(OSError) as caught:
            (inside / "a.bin").parent.mkdir(parents=True)
            (inside / "a.bin").write_bytes(b"0123456789")
        atomic_write_bytes(outside / "b.bin", b"fine")
    assert caught.value.errno == errno.ENOSPC and hits == [inside / "a.bin"]
    assert (inside / "a.bin").read_bytes() == b"0123"  # a partial file, as a real full disk leaves
    assert (outside / "b.bin").read_bytes() == b"fine"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_atomic_write_leaves_no_temporary_and_keeps_the_old_file(monkeypatch, tmp_path: Path, code: int):
    from tumorseg.io import OutputError

    target = tmp_path / "out" / "report.json"
    atomic_write_bytes(target, b'{"old": true}')
    with disk_fault(tmp_path / "out", code) as hits, pytest.raises(OutputError) as caught:
        atomic_write_bytes(target, b'{"new": true}' * 100)
    assert hits
    assert str(target) in str(caught.value) and os.strerror(code) in str(caught.value)
    assert target.read_bytes() == b'{"old": true}'
    assert hidden_files(tmp_path / "out") == []


# --------------------------------------------------------------------------------------------
# Prepare
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code, cause", FAULTS)
def test_prepare_into_a_faulty_folder_fails_cleanly_and_keeps_the_previous_output(
    pair_folder: Path, tmp_path: Path, monkeypatch, capsys, code: int, cause: str
):
    monkeypatch.chdir(tmp_path)  # no params.yaml: the documented defaults
    out = tmp_path / "data" / "prepared"
    args = ["prepare", "--images", str(pair_folder / "images"), "--masks", str(pair_folder / "masks"), "--out", str(out), "--size", "32"]
    assert cli_main(args) == 0
    previous, inputs = hash_tree(out), hash_tree(pair_folder)
    manifest = sha256_file(out / "manifest.csv")
    capsys.readouterr()

    with disk_fault(out.parent, code) as hits:
        status = cli_main(args)
    err = capsys.readouterr().err

    assert hits, "the fault was never hit"
    assert status == 1
    line = one_error_line(err)
    assert str(out) in line and cause in line
    assert hash_tree(out) == previous and sha256_file(out / "manifest.csv") == manifest, "the previous output changed"
    assert hash_tree(pair_folder) == inputs, "inputs changed"
    assert hidden_files(out.parent) == [], "a staging folder or temporary file was left"


# --------------------------------------------------------------------------------------------
# Training (the DVC stage script, in-process)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory) -> Path:
    from tumorseg.config import load_config
    from tumorseg.data.synthetic import write_synthetic_dataset
    from tumorseg.pipeline.prepare import prepare_step

    root = tmp_path_factory.mktemp("faulty-train")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params.update(profile="full", epochs=2, image_size=32, batch_size=8, lr=1e-3)
    params["models"]["unet"].update(TINY_UNET)
    params["train"].update(deterministic=False, early_stopping_patience=0, reduce_lr_patience=0, online_augment=False, lr_scale=1, lr_schedule="plateau")
    params["prepare"].update(group_by="none", workers=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    write_synthetic_dataset(root / "raw", count=24, size=32, seed=0, progress=False)
    record = {"data_source": "synthetic", "data_origin": "test", "data_hash": "0" * 64}
    prepare_step(
        load_config(root / "params.yaml"),
        root / "raw" / "images",
        root / "raw" / "masks",
        root / "data" / "prepared",
        progress=False,
        report_extra=record,
    )
    return root


def run_train_stage(root: Path, work: Path, monkeypatch) -> int:
    """``stages/train.py --model unet`` in this process, writing under ``work``."""
    spec = importlib.util.spec_from_file_location("train_stage", PROJECT_ROOT / "stages" / "train.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    work.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(work)  # MLflow's default artifact folder (./mlruns) lands in the work folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    monkeypatch.setenv("TUMORSEG_PROGRESS", "0")
    argv = [
        "train.py",
        "--model", "unet",
        "--params", str(root / "params.yaml"),
        "--prepared", str(root / "data" / "prepared"),
        "--augmented", str(work / "none"),
        "--models-dir", str(work / "models"),
        "--metrics-dir", str(work / "metrics"),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    return stage.main()


def mlflow_runs(work: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tumorseg")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.fixture(scope="module")
def trained_once(tiny_project: Path, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("trained") / "work"
    with pytest.MonkeyPatch.context() as scoped:
        assert run_train_stage(tiny_project, work, scoped) == 0
    return work


@pytest.fixture
def trained(trained_once: Path, tmp_path: Path) -> Path:
    """A work folder holding a completed run's outputs (the 'previous good output') and its MLflow store."""
    work = tmp_path / "work"
    shutil.copytree(trained_once, work)
    return work


@pytest.mark.slow
@pytest.mark.parametrize(
    "what, folder, match",
    [
        ("checkpoint save", "models", lambda path: path.suffix == ".keras"),
        ("history write", "metrics", lambda path: "history_unet" in path.name),
    ],
    ids=["checkpoint", "history"],
)
@pytest.mark.parametrize("code, cause", FAULTS)
def test_training_with_a_faulty_output_fails_cleanly_then_resumes(tiny_project: Path, trained: Path, monkeypatch, capsys, what, folder, match, code, cause):
    work = trained
    model, history = work / "models" / "unet.keras", work / "metrics" / "history_unet.csv"
    before = {path: sha256_file(path) for path in (model, history)}
    inputs = hash_tree(tiny_project / "data" / "prepared")
    capsys.readouterr()

    with disk_fault(work / folder, code, match=match) as hits:
        status = run_train_stage(tiny_project, work, monkeypatch)
    err = capsys.readouterr().err

    assert hits, f"the {what} never hit the fault"
    assert status == 1
    line = one_error_line(err)
    assert cause in line and str(work / folder) in line, line
    assert {path: sha256_file(path) for path in (model, history)} == before, "the previous good output changed"
    assert hash_tree(tiny_project / "data" / "prepared") == inputs
    assert [name for name in hidden_files(work / "models") + hidden_files(work / "metrics") if not name.startswith(".state")] == []
    state = work / "models" / ".state" / "unet"
    assert [p.name for p in state.iterdir() if p.name.startswith(".")] == [], "a partial checkpoint was left"

    # Space freed / folder writable again: the same command completes, every epoch once, one new MLflow run.
    assert run_train_stage(tiny_project, work, monkeypatch) == 0
    assert history.read_text().splitlines()[1].startswith("1,") and [r.split(",")[0] for r in history.read_text().splitlines()[1:]] == ["1", "2"]
    runs = mlflow_runs(work)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}, "the failed attempt and its resume are one run"
    assert not state.exists()


@pytest.mark.slow
def test_training_into_a_read_only_models_folder_stops_before_training(tiny_project: Path, tmp_path: Path, monkeypatch, capsys):
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    with disk_fault(work / "models", errno.EROFS) as hits:
        status = run_train_stage(tiny_project, work, monkeypatch)
    captured = capsys.readouterr()
    assert hits and status == 1
    line = one_error_line(captured.err)
    assert str(work / "models" / ".state" / "unet") in line and "Read-only file system" in line
    assert list((work / "models").iterdir()) == []
    assert "Epoch 1/" not in captured.out + captured.err, "training must not start when its state cannot be saved"
