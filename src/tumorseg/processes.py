"""Worker process pools that never outlive the stage that started them.

A stage killed with SIGKILL cannot shut its pool down. Each worker therefore asks the kernel for a
parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG)``), and workers are started with ``spawn``
so that their parent *is* the stage: under ``forkserver`` their parent is the fork server, which
every worker keeps alive (each holds its "alive" pipe), so the whole tree lingered after a kill.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1


def default_workers() -> int:
    """The CPUs this process may run on (not the machine's count: containers and taskset limit it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; elsewhere a no-op).

    ``parent``: the pid the caller knows its parent by. A spawned worker takes seconds to start on
    a busy machine; if the stage was killed meanwhile, ``os.getppid()`` already names the process
    that adopted the worker, so only a pid recorded before the spawn can tell that it is orphaned.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if parent is None else parent
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


def _start_worker(parent: int, initializer: Callable | None, initargs: tuple) -> None:
    die_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def worker_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A process pool whose workers die with the process that made it.

    Never ``fork``: a parent that already ran OpenCV (or TensorFlow) holds thread-pool locks that a
    forked child inherits locked, and hangs; ``spawn`` starts each worker as a clean interpreter.
    """
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(os.getpid(), initializer, initargs),
    )
