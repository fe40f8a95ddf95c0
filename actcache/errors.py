"""Exceptions raised by actcache.

Every message says what to do next. The library never prints and never exits;
only the CLI turns these into exit codes and one-line messages.
"""


class ActcacheError(Exception):
    """Base class for every error actcache raises on purpose."""

    exit_code = 1


class ConfigError(ActcacheError, ValueError):
    """An option or config value is invalid (bad layer, unknown component, ...)."""

    exit_code = 2


class MissingExtraError(ConfigError):
    """A part of actcache is used without the optional packages it needs; the
    message names the extra to install (`pip install 'actcache[serve]'`)."""

    def __init__(self, message: str, extra: str = ""):
        super().__init__(message)
        self.extra = extra


class OverlapError(ConfigError):
    """An SAE of the build trained on the text of examples the study evaluates."""


class DatasetError(ActcacheError, ValueError):
    """A dataset is missing, empty, or lacks a field."""

    exit_code = 3


class ModelError(ActcacheError):
    """A model or tokenizer could not be loaded, or cannot do what was asked."""

    exit_code = 4


class StoreError(ActcacheError):
    """A build is missing from the store, or the store cannot be used."""

    exit_code = 5


class CorruptStoreError(StoreError):
    """A store file is unreadable, foreign, or from another format version."""


class MismatchError(StoreError):
    """Two artifacts that must belong together do not (index vs build, matrix vs build)."""


class MissingModelError(MissingExtraError, ModelError):
    """A packaged model (the default model, the sentence encoder) is not installed:
    a ModelError too, so that an optional strategy that needs it is skipped."""

    exit_code = ModelError.exit_code


class LabelWordError(ModelError, ValueError):
    """A label word cannot be represented by the tokenizer as required."""


class BusyError(ActcacheError):
    """A service is at capacity (its queue is full, or a request ran past its
    deadline); `retry_after` says how many seconds to wait before trying again."""

    exit_code = 6

    def __init__(self, message: str, retry_after: int = 1, queue_full: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.queue_full = queue_full


# Exit codes of the command line besides each error's `exit_code` (a usage error
# the parser catches, such as an unknown choice, exits 2 like ConfigError).
EXIT_PROBLEMS = 1  # `verify` found damage it did not repair
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); rerunning the same command resumes
