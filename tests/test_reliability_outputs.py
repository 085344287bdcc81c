"""Nothing of the user's is ever lost, a killed stage leaves nothing running or lying about, and
outputs are readable by the team.

Each test here failed on the code before: ``prepare --out d`` deleted the inputs in ``d``, an
existing folder was replaced wholesale, a file at ``--out`` became a hidden ``.NAME.old``, workers
outlived a killed prepare, staging folders piled up, and files were written 0600 / folders 0700.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import blob_pair, write_pair
from tumorseg.cli import main as cli_main
from tumorseg.io import OUTPUT_MARKER, atomic_directory, atomic_write_bytes, hash_tree, sweep_stale_staging


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: any change, deletion or addition shows."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def data(tmp_path: Path, monkeypatch) -> Path:
    """``d/images``, ``d/masks`` (12 pairs) and an unrelated file of the user's in ``d``."""
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the documented defaults
    root = tmp_path / "d"
    for index in range(1, 13):
        write_pair(root, f"{index}.png", *blob_pair(64, index))
    (root / "notes.txt").write_text("the user's own notes")
    return root


@pytest.mark.parametrize(
    "out, why",
    [
        ("d", "contains the input"),  # deleted the raw images, the masks and notes.txt
        ("d/images", "is the input"),  # replaced the originals with resized copies
        ("d/images/sub", "is inside the input"),
    ],
)
def test_prepare_never_writes_over_or_around_its_inputs(data: Path, capsys, out: str, why: str):
    before = _tree(data)
    status = cli_main(["prepare", "--images", "d/images", "--masks", "d/masks", "--out", out, "--size", "32"])
    assert status == 2
    line = _error_line(capsys)
    assert out in line and why in line
    assert _tree(data) == before, "an input was changed"
    assert not [p for p in data.parent.iterdir() if p.name.startswith(".")], "something was staged beside the inputs"


def test_an_existing_folder_that_tumorseg_did_not_write_is_never_replaced(data: Path, tmp_path: Path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    status = cli_main(["prepare", "--images", "d/images", "--masks", "d/masks", "--out", "mine", "--size", "32"])
    assert status == 2
    line = _error_line(capsys)
    assert "mine" in line and "did not write" in line
    assert _tree(mine) == {"thesis.tex": b"months of work"}

    # augment --out EXISTING deleted what was there
    assert cli_main(["prepare", "--images", "d/images", "--masks", "d/masks", "--out", "prepared", "--size", "32"]) == 0
    assert cli_main(["augment", "--prepared", "prepared", "--out", "mine", "--preview", "preview.png"]) == 2
    assert "mine" in _error_line(capsys)
    assert _tree(mine) == {"thesis.tex": b"months of work"}


def test_a_file_at_the_output_path_is_refused_not_hidden(data: Path, tmp_path: Path, capsys):
    target = tmp_path / "results"
    target.write_text("a file the user keeps")
    assert cli_main(["prepare", "--images", "d/images", "--masks", "d/masks", "--out", "results", "--size", "32"]) == 2
    assert "results" in _error_line(capsys)
    assert target.read_text() == "a file the user keeps"
    assert not list(tmp_path.glob(".results*")), "the file was renamed out of the way"


def test_a_folder_tumorseg_wrote_is_replaced_and_an_empty_one_filled(data: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    assert cli_main(["prepare", "--images", "d/images", "--masks", "d/masks", "--out", "empty", "--size", "32"]) == 0
    first = hash_tree(tmp_path / "empty")
    assert (tmp_path / "empty" / OUTPUT_MARKER).is_file()
    assert cli_main(["prepare", "--images", "d/images", "--masks", "d/masks", "--out", "empty", "--size", "64"]) == 0
    assert hash_tree(tmp_path / "empty") != first  # replaced by the new run


def test_download_and_synth_refuse_to_overlap_or_overwrite(tmp_path: Path, capsys, monkeypatch):
    from tumorseg.data.sources import download
    from tumorseg.io import UnsafeOutputError

    monkeypatch.chdir(tmp_path)
    source = tmp_path / "pairs"
    for index in range(1, 4):
        write_pair(source, f"{index}.png", *blob_pair(32, index))
    before = _tree(source)
    common = dict(
        source="local",
        kaggle_dataset="-",
        network_timeout_s=1,
        image_dir="images",
        mask_dir="masks",
        mask_suffix="",
        synthetic_count=1,
        synthetic_size=32,
        seed=0,
        progress=False,
    )
    for out in (source, source / "raw", source / "images"):
        with pytest.raises(UnsafeOutputError, match="input"):
            download(out, local_path=str(source), **common)
    assert _tree(source) == before

    # `tumorseg synth --out` wrote (and overwrote 00001.png) into any folder
    assert cli_main(["synth", "--out", "pairs/images", "--count", "2", "--size", "32"]) == 2
    assert "pairs/images" in _error_line(capsys)
    assert _tree(source) == before
    assert cli_main(["synth", "--out", "phantoms", "--count", "2", "--size", "32"]) == 0
    assert cli_main(["synth", "--out", "phantoms", "--count", "3", "--size", "32"]) == 0  # its own folder: replaced
    assert len(list((tmp_path / "phantoms" / "images").iterdir())) == 3


@pytest.mark.parametrize("command", ["predict", "explain"])
@pytest.mark.parametrize("out", ["d", "d/images", "d/images/predicted", "d/images/1.png"])
def test_predict_and_explain_never_write_among_their_inputs(data: Path, capsys, command: str, out: str):
    before = _tree(data)
    # refused before the model is even loaded (it does not exist)
    assert cli_main([command, "d/images", "--model", "no-such-model.keras", "--out", out]) == 2
    line = _error_line(capsys)
    assert "--out" in line and "input" in line
    assert _tree(data) == before


# --------------------------------------------------------------------------------------------
# Kills: no lingering workers, no staging debris
# --------------------------------------------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _alive(pids: set[int]) -> set[int]:
    import psutil

    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_workers_and_its_debris_is_swept(tmp_path: Path):
    from tumorseg.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "raw", count=600, size=256, seed=0, progress=False)
    out = tmp_path / "prepared"
    command = [
        sys.executable, "-m", "tumorseg.cli", "prepare",
        "--images", "raw/images",
        "--masks", "raw/masks",
        "--out", "prepared",
        "--size", "64",
        "--params", "none.yaml",
    ]  # fmt: skip
    env = dict(os.environ, TUMORSEG_PROGRESS="0")
    (tmp_path / "none.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text().replace("workers: 0", "workers: 2"))
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: set[int] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        workers |= _descendants(process.pid)
        staged = list(tmp_path.glob(".prepared.*.tmp/all/images/*.png"))
        if len(workers) >= 2 and len(staged) >= 20:  # 2 workers, busy
            break
        time.sleep(0.05)
    assert process.poll() is None, f"prepare ended before the kill: {process.stderr.read().decode()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()

    deadline = time.monotonic() + 30  # a worker still starting up (seconds on a busy machine) exits once it runs
    while time.monotonic() < deadline and _alive(workers):
        time.sleep(0.1)
    assert not _alive(workers), f"worker processes outlived the killed stage: {_alive(workers)}"
    debris = list(tmp_path.glob(".prepared.*.tmp"))
    assert debris and not out.exists()

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(tmp_path.glob(".prepared.*")), "the next run did not sweep the killed run's staging folder"
    assert len(list((out / "train" / "images").iterdir())) > 100


def test_sweep_keeps_a_live_writers_staging_and_restores_a_torn_swap(tmp_path: Path):
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("first")
    # a live writer (this process) is mid-way: its staging folder must survive a sweep by another run
    live = tmp_path / f".out.{os.getppid()}.abc123.tmp"
    live.mkdir()
    (live / OUTPUT_MARKER).write_text("")
    # a kill between the two renames of a swap: the output is only in the backup
    os.replace(target, tmp_path / ".out.999999999.old")
    sweep_stale_staging(target)
    assert (target / "a.txt").read_text() == "first", "the previous output was not put back"
    assert live.is_dir()


# --------------------------------------------------------------------------------------------
# Permissions follow the umask
# --------------------------------------------------------------------------------------------


def _modes(folder: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_honour_the_umask(data: Path, tmp_path: Path, umask: int, file_mode: int, dir_mode: int):
    previous = os.umask(umask)
    try:
        assert cli_main(["synth", "--out", "raw", "--count", "12", "--size", "64"]) == 0
        assert cli_main(["prepare", "--images", "d/images", "--masks", "d/masks", "--out", "prepared", "--size", "32"]) == 0
        atomic_write_bytes(tmp_path / "metrics" / "m.json", b"{}")
    finally:
        os.umask(previous)
    for folder in (tmp_path / "raw", tmp_path / "prepared", tmp_path / "metrics"):
        assert _modes(folder) == {("dir", dir_mode), ("file", file_mode)}, folder
