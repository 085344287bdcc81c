"""File output that an interrupted stage can never leave half-written.

Every file a stage writes goes through :func:`atomic_write_bytes` (temp file in the same folder,
fsync, ``os.replace``) and every output folder through :func:`atomic_directory` (built beside the
target, synced once, swapped in only when complete; files inside its staging folder are written
with :func:`write_staged_bytes`). Readers see the old version or the new one, never a mix.

Nothing of the user's is ever lost: an output folder may not equal, contain or sit inside an
input (:func:`check_separate`), and an existing folder is replaced only when tumorseg wrote it (it
holds the :data:`OUTPUT_MARKER` file). Files and folders get the permissions the umask allows
(0644/0755 under umask 022), as ``open`` and ``mkdir`` would give, not ``tempfile``'s private 0600/0700.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tumorseg.errors import OutputError, UnsafeOutputError  # noqa: F401 - raised here, defined with the other user errors

OUTPUT_MARKER = ".tumorseg-output"  # in every folder atomic_directory made: only such folders are ever replaced


_HINTS = {
    errno.ENOSPC: "free some disk space (or write elsewhere) and run it again",
    errno.EDQUOT: "your disk quota is used up: free some space and run it again",
    errno.EROFS: "the file system is read-only: choose a writable output folder",
    errno.EACCES: "you lack permission to write there: choose another folder or fix its permissions",
    errno.EPERM: "you lack permission to write there: choose another folder or fix its permissions",
}


def describe_os_error(path: str | Path, exc: OSError) -> str:
    """One line naming the path, the cause and what to do (no traceback needed)."""
    if isinstance(exc, OutputError):  # raised by a nested writer: describe its cause for this path
        if not isinstance(exc.__cause__, OSError):
            return str(exc)
        exc = exc.__cause__
    reason = exc.strerror or str(exc)
    hint = _HINTS.get(exc.errno or 0, "check that the folder is writable and the disk has space")
    return f"cannot write {path}: {reason}; {hint}."


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # not Linux: read it by setting it, and put it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(describe_os_error(path, exc)) from exc
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: a teammate could not read it
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise OutputError(describe_os_error(path, exc)) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return path


def write_staged_bytes(path: str | Path, data: bytes) -> Path:
    """Write a file inside an :func:`atomic_directory` staging folder.

    No temporary file and no per-file fsync: nobody reads the staging folder until it is swapped
    in complete, and :func:`atomic_directory` makes it durable with one sync before the swap.
    (A per-file fsync cost more than decoding and encoding the image in the prepare and augment
    stages: see benchmarks/results/prepare.json.)
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise OutputError(describe_os_error(path, exc)) from exc
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def atomic_write_figure(path: str | Path, fig) -> Path:
    """Render a matplotlib figure to PNG in memory, close it, then write the file atomically."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def encode_png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"OpenCV could not encode an array of shape {image.shape} as PNG")
    return buffer.tobytes()


def atomic_write_png(path: str | Path, image: np.ndarray) -> Path:
    return atomic_write_bytes(path, encode_png(image))


def write_staged_png(path: str | Path, image: np.ndarray) -> Path:
    return write_staged_bytes(path, encode_png(image))


def check_separate(output: str | Path, inputs: Iterable[str | Path], *, what: str = "the output") -> None:
    """Refuse, before anything is written, an output that equals, contains or sits inside an input.

    Replacing such an output would delete the input (``prepare --out d`` with ``d/images`` as input)
    or write over it (``--out d/images``). Symlinks are followed, so two names for one folder clash.
    """
    out = Path(output).resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if out == source_path:
            problem = f"is the input {source} itself"
        elif source_path in out.parents:
            problem = f"is inside the input {source}"
        elif out in source_path.parents:
            problem = f"contains the input {source}, which replacing it would delete"
        else:
            continue
        raise UnsafeOutputError(f"{what} {output} {problem}: choose an output folder outside the inputs")


def check_replaceable(target: str | Path) -> None:
    """An existing ``target`` may be replaced only if tumorseg made it (or it is an empty folder)."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise UnsafeOutputError(f"{target} exists and is not a folder: choose a new folder name for the output")
    if (target / OUTPUT_MARKER).is_file() or not any(target.iterdir()):
        return
    raise UnsafeOutputError(
        f"{target} is a folder that tumorseg did not write (no {OUTPUT_MARKER} in it), so it will not be replaced: "
        "choose a new or empty folder, or move its contents away first"
    )


def _writer_alive(leftover: str, target_name: str) -> bool:
    """Whether the process named in a leftover (``.NAME.PID.xxxx.tmp``, ``.NAME.PID.old``) still runs."""
    try:
        pid = int(leftover[len(target_name) + 2 :].split(".", 1)[0])
    except ValueError:  # an older version's name, without a pid
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return pid != os.getpid()


def sweep_stale_staging(target: str | Path) -> list[Path]:
    """Remove what a killed :func:`atomic_directory` of ``target`` left beside it; returns what went.

    Staging folders whose writer is dead are deleted (a live concurrent writer's are kept). A
    backup left by a kill between the two renames of a swap is put back when ``target`` is missing,
    so the previous output is never lost; otherwise it is deleted.
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in sorted(target.parent.glob(f".{glob.escape(target.name)}.*")):
        if not path.is_dir() or path.is_symlink() or not (path / OUTPUT_MARKER).is_file() or _writer_alive(path.name, target.name):
            continue
        if path.name.endswith(".old") and not target.exists():
            os.replace(path, target)
            continue
        if path.name.endswith((".tmp", ".old")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a fresh staging folder that replaces ``target`` only if the block completes.

    Refused up front (:class:`UnsafeOutputError`) when ``target`` overlaps one of ``inputs`` or is
    something tumorseg did not write. On error the staging folder is removed and ``target`` (if any)
    is left untouched; a kill leaves a staging folder that the next run for ``target`` removes.
    """
    check_separate(target, inputs)
    check_replaceable(target)
    target = Path(os.path.abspath(target))  # `--out .` has no name to stage beside
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_staging(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700
        (staging / OUTPUT_MARKER).write_text("written by tumorseg: this folder is replaced whole when its stage runs again\n")
        yield staging
        os.sync()  # one flush for everything staged (files written with write_staged_bytes are not fsynced)
        backup = None
        if target.exists():
            check_replaceable(target)  # again: it may have changed while we worked
            backup = target.with_name(f".{target.name}.{os.getpid()}.old")
            os.replace(target, backup)
        os.replace(staging, target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OutputError):
            raise
        raise OutputError(describe_os_error(target, exc)) from exc
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: str | Path, files: Iterable[Path] | None = None) -> str:
    """Content hash of a folder: sha256 over sorted (relative path, file sha256) pairs."""
    root = Path(root)
    paths = sorted(files) if files is not None else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in paths:
        relative = path.relative_to(root).as_posix()
        if relative.split("/")[-1].startswith("."):
            continue
        digest.update(relative.encode("utf-8") + b"\0" + sha256_file(path).encode("ascii") + b"\n")
    return digest.hexdigest()


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# Metric files hold numbers only, so `dvc metrics show` / `dvc exp show` stay readable tables;
# what describes the numbers (data source and hash, model, settings, run ids, per-patient detail)
# goes to the sibling ``<stem>.info.json`` (a plain output, not a metric). read_metrics merges both.
INFO_SUFFIX = ".info.json"


def info_path(metrics_path: str | Path) -> Path:
    """``metrics/evaluate_unet.json`` -> ``metrics/evaluate_unet.info.json``."""
    path = Path(metrics_path)
    return path.with_name(path.name.removesuffix(".json") + INFO_SUFFIX)


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def is_metric(value: Any) -> bool:
    """A number (None = not measurable, e.g. HD95 without a tumour), or one level of them by name."""
    return _is_number(value) or (isinstance(value, dict) and bool(value) and all(isinstance(k, str) and _is_number(v) for k, v in value.items()))


def write_metrics(path: str | Path, values: dict[str, Any], *, detail: Iterable[str] = ()) -> dict[str, Any]:
    """Write the numbers of ``values`` to ``path`` and everything else (plus the ``detail`` keys,
    e.g. a number per patient) to its :func:`info_path` sibling. Returns ``values``."""
    detail = set(detail)
    numbers = {key: value for key, value in values.items() if key not in detail and is_metric(value)}
    atomic_write_json(path, numbers)
    atomic_write_json(info_path(path), {key: value for key, value in values.items() if key not in numbers})
    return values


def read_metrics(path: str | Path) -> dict[str, Any]:
    """A metric file with its ``.info.json`` sibling merged in (files written before the split: as they are)."""
    values = read_json(path)
    extra = info_path(path)
    return values | read_json(extra) if extra.exists() else values
