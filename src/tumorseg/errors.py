"""The errors a user can cause and fix, in one ground-floor module (it imports nothing); the
config's own ``ConfigError`` lives with the config.

The CLI and the stage scripts turn these into one ``error: ...`` line and an exit code
(:mod:`tumorseg.console`): 2 for a refusal before any work started, 1 for a problem met while
working. Keeping the types here lets the front end know them without importing the modules
that raise them, so a stage script imports only the code it runs.
"""

from __future__ import annotations

EMPTY = "empty"
UNREADABLE = "unreadable"
TOO_LARGE = "too_large"


class UsageError(ValueError):
    """A bad option value on the command line, found before any work starts."""


class OutputError(OSError):
    """An output could not be written (read-only folder, disk full, ...): names the path."""


class UnsafeOutputError(OutputError):
    """Writing the output would overwrite or delete something that is not ours (an input, a user's folder)."""


class SourceError(RuntimeError):
    """The requested data source cannot be used; the message says what to set or fix."""


class PrepareError(RuntimeError):
    """A pair failed a check under ``on_error=fail``, or the input cannot be prepared at all."""


class NoValidPairs(PrepareError):
    """Nothing survived the checks: the stage exits with code 2."""


class InputImageError(ValueError):
    """An input is not a usable image; the message names the input and the reason.

    ``kind`` says why in one word (:data:`EMPTY`, :data:`UNREADABLE` or :data:`TOO_LARGE`) so that
    callers can sort refusals without parsing the message.
    """

    def __init__(self, message: str, kind: str = UNREADABLE) -> None:
        super().__init__(message)
        self.kind = kind


class VolumeError(InputImageError):
    """A NIfTI input is not a usable volume (unreadable, not 3-D, not real-valued, volumes of one
    case that disagree); the message names the file."""


class SequenceMismatch(UsageError):
    """The input's MRI sequences are not the ones the model was trained on (names or order)."""


class ModelCardError(UsageError):
    """A model's ``<model>.card.json`` cannot be read or holds a bad setting: names the file."""


class ModelLoadError(ValueError):
    """A model file or URI cannot be loaded; the message names it and the reason."""


class ExportError(RuntimeError):
    """The model cannot be exported as asked, or the export failed its check."""


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before any training starts."""


class ServerError(RuntimeError):
    """The local MLflow tracking server (``tumorseg server``) cannot be started or stopped as asked:
    PostgreSQL missing, a port in use, a process that does not start or stop; names what to do."""
