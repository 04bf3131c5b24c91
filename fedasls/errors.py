"""The base of every error a user can fix from its message alone.

Each one's text says what is wrong, where (file, line, key) and how to fix it; the `fedasls`
command prints it as one paragraph, without a traceback, and exits non-zero.
"""


class FedaslsError(Exception):
    """Bad input or a failed run, explained in the message (what, where, how to fix)."""

    exit_code = 2  # bad input; a run that failed exits 1
    quotes_data = False  # its text names files, lines, keys and types, never a value from user data


class ModelNotFoundError(FedaslsError, FileNotFoundError):
    """A model path is missing or is not a local Hugging Face causal-LM folder."""
