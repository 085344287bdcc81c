"""File output that an interrupted stage can never leave half-written.

Every file a stage writes goes through :func:`atomic_write_bytes` (temp file in the same folder,
fsync, ``os.replace``) and every output folder through :func:`atomic_directory` (built beside the
target, synced once, swapped in only when complete; files inside its staging folder are written
with :func:`write_staged_bytes`). Readers see the old version or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
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


class OutputError(OSError):
    """An output could not be written (read-only folder, disk full, ...): names the path."""


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


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(describe_os_error(path, exc)) from exc
    try:
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


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh staging folder that replaces ``target`` only if the block completes.

    On error the staging folder is removed and ``target`` (if any) is left untouched.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise OutputError(describe_os_error(target, exc)) from exc
    try:
        yield staging
        os.sync()  # one flush for everything staged (files written with write_staged_bytes are not fsynced)
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(target, backup)
        os.replace(staging, target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(describe_os_error(target, exc)) from exc
    except BaseException:
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
