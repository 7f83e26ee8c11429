"""User-facing errors: one clear message that says what was expected and how to fix it.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class CrossDistillError(Exception):
    """Base of every error the user can fix (bad path, mismatched config, malformed data, ...)."""


class ModelLoadError(CrossDistillError):
    """A model folder or hub id is missing, corrupt, or holds another family than asked for."""


class ConfigError(CrossDistillError):
    """A config key, value or run directory is wrong."""


class DataError(CrossDistillError):
    """A prompt or image set is empty or malformed."""


class SpaceMismatchError(CrossDistillError):
    """A Bridge (or checkpoint) was built for other latent spaces than the ones it is used with."""
