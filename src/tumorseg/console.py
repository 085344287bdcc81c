"""Shared front-end behaviour of the CLI and the DVC stage scripts.

Errors that come from bad input or settings (not bugs) are printed as one readable line with
no traceback; set ``TUMORSEG_DEBUG=1`` to see the traceback anyway.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from tumorseg.config import ERROR_PREFIX, MAX_ERROR_CHARS, ConfigError, clip
from tumorseg.errors import (
    ExportError,
    InputImageError,
    ModelLoadError,
    NoValidPairs,
    OutputError,
    PrepareError,
    ServerError,
    SourceError,
    TrackingError,
    UnsafeOutputError,
    UsageError,
)
from tumorseg.io import describe_os_error

F = TypeVar("F", bound=Callable[..., int | None])

# Exit codes: 1 = a user-fixable error met while working (the message says what); 2 = refused
# before any work started (bad params or option, an output that would hit the inputs) or nothing
# valid to work on. Either way nothing of the user's was changed.
REFUSALS: tuple[type[BaseException], ...] = (UsageError, ConfigError, UnsafeOutputError, NoValidPairs)
USER_ERRORS: tuple[type[BaseException], ...] = (
    SourceError,
    PrepareError,
    OutputError,
    FileNotFoundError,
    InputImageError,
    ModelLoadError,
    ExportError,
    TrackingError,
    ServerError,
)
# Raw OSErrors that mean "the disk or folder refuses the write", wherever they come from (a
# library writing its own file): one line naming the path and the cause, like OutputError.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def show_progress() -> bool:
    """Progress bars on a terminal; off in CI logs and pipes unless asked for."""
    forced = os.environ.get("TUMORSEG_PROGRESS")
    if forced is not None:
        return forced not in ("0", "false", "no")
    return sys.stderr.isatty() and not os.environ.get("CI")


def friendly_errors(func: F) -> F:
    """Turn expected errors into ``error: ...`` on stderr and an exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:
        try:
            return func(*args, **kwargs) or 0
        except REFUSALS as exc:
            _report(exc)
            return 2
        except USER_ERRORS as exc:
            _report(exc)
            return 1
        except OSError as exc:
            if exc.errno not in STORAGE_ERRNOS:
                raise
            _report(exc, describe_os_error(exc.filename or "an output file", exc))
            return 1
        except KeyboardInterrupt:
            print("interrupted: outputs were left as they were before this run", file=sys.stderr)
            return 130

    return wrapper  # type: ignore[return-value]


def _report(exc: BaseException, message: str | None = None) -> None:
    """One line of at most MAX_ERROR_CHARS characters, whatever the message (a path, a YAML dump...)."""
    if os.environ.get("TUMORSEG_DEBUG"):
        import traceback

        traceback.print_exception(exc)
    print(ERROR_PREFIX + clip(message or str(exc), MAX_ERROR_CHARS - len(ERROR_PREFIX)), file=sys.stderr)
