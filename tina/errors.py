"""Errors a user can cause. Each message says what to do; the endpoint maps them to 4xx JSON."""


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
