"""The project's error types. Each is a ``ValueError`` whose message names the file or option at fault.

The CLI turns every one of them into one line on stderr and exit code 2.
"""


class DataError(ValueError):
    """Bad or unsafe input data. The message starts with the offending file's path."""


class ConfigError(ValueError):
    """A configuration that cannot run (conflicting paths, a run folder that would be overwritten, ...)."""


class LLMLoadError(ValueError):
    """The LLM (or its tokenizer) could not be loaded; the message names what was asked for and what was tried."""


CLI_ERRORS: tuple[type[ValueError], ...] = (DataError, ConfigError, LLMLoadError)
"""What the CLI reports as one line and exit code 2."""
