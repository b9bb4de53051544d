"""User-facing errors: the CLI prints them as one line (no traceback) and exits non-zero."""


class EngineError(Exception):
    """A problem with the user's input or environment that the user can fix."""

    exit_code = 2


class ConfigError(EngineError):
    """Bad configuration: unknown key, wrong type, bad value or incompatible options."""


class DataError(EngineError):
    """Bad training data: missing, empty, undecodable or too small."""


class ModelLoadError(EngineError):
    """The model could not be loaded (offline hub, bad path)."""
