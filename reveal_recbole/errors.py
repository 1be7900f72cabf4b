"""Errors caused by the user's input: command-line entry points print their message, no traceback."""


class UserInputError(Exception):
    """Bad input (a file, a name, a config value); the message names it and says what to do."""


class ConfigError(UserInputError, ValueError):
    """A config key with a value the package cannot use."""


class UnknownModelError(UserInputError, ValueError):
    """A model name that neither reveal-recbole nor RecBole defines."""


class FeatureFileError(UserInputError, ValueError):
    """A feature file that cannot be attached to the dataset."""


class DatasetNotPreparedError(UserInputError, FileNotFoundError):
    """A dataset whose files are missing; the message names them and the command that makes them."""


class DatasetFileError(UserInputError, ValueError):
    """A dataset file (``.inter``, ``.item``) RecBole cannot read; the message names the file, line and column."""


class BackboneError(UserInputError, TypeError):
    """A backbone REVEAL cannot wrap (or not on this data); the message names the backbone and the reason."""


class PreparationError(UserInputError, RuntimeError):
    """A stage of preparing a dataset failed (an HTTP error, a timeout, a truncated archive, a full disk); the
    message names the stage and the URL or file. Nothing half-written is left looking complete: rerun to resume."""
