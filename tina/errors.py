"""Errors a user can cause. Each message says what to do; the endpoint maps them to 4xx JSON."""

from __future__ import annotations

import sys
from collections.abc import Callable


class TinaError(Exception):
    """Base class of every error a user of Tina can cause."""


class ConfigError(TinaError):
    """A config file, key or override is wrong."""


class DataNotFoundError(TinaError):
    """Dataset files are missing; the message says how to get them."""


class UnknownDatasetError(TinaError):
    """A dataset name is not in the registry."""


class PromptError(TinaError):
    """A prompt is empty, too long, has duplicates, or names a class the dataset lacks."""


class WeightsNotFoundError(TinaError):
    """Encoder weights are missing; the message names the fix."""


class CheckpointError(TinaError):
    """A checkpoint is missing, malformed, or made with another encoder/label space/architecture."""


def run_reporting_user_errors(fn: Callable[[], object]) -> int:
    """Run a command's body; return its exit status for `SystemExit`.

    An error the user can fix (a TinaError, or an OSError such as an unwritable --out or a full
    disk) prints one `error:` line on stderr and gives 2 instead of a traceback; 0 otherwise.
    Shared by the `tina` CLI and the `python -m jobs.*` entry points.
    """
    try:
        fn()
    except TinaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # say which path
        print(f"error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2
    return 0
