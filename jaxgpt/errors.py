"""jaxgpt's exceptions: `ValueError`s whose message says what was wrong and what was expected.

The CLI turns a `JaxgptError` into a one-line message and exit code 2, never a traceback.
"""


class JaxgptError(ValueError):
    """Base class of every error jaxgpt raises for bad input."""


class ConfigError(JaxgptError):
    """A configuration value is invalid; the message names the field."""


class InputError(JaxgptError):
    """An argument (tokens, prompt, sampling option, path ...) is invalid."""


class CheckpointFormatError(JaxgptError):
    """A model or checkpoint directory is missing, incomplete, or of the wrong kind."""


class TokenizerError(JaxgptError):
    """A tokenizer could not be built or could not encode the given text."""


class ChatFormatError(JaxgptError):
    """A conversation (or chat data file) is not in the chat format; the message says where."""


class MissingExtraError(JaxgptError):
    """An optional dependency is not installed; the message names the extra that provides it."""
