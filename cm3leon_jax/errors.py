"""The one exception for mistakes in a user's input, found at run time.

A run mode raises `UserInputError` when what the user gave (a folder, a file, a
MODEL_DIR, a checkpoint that does not fit the config) cannot work; the message
names the input and what to do, in one line. `cm3leon_jax.main` prints it as
`error: <message>` and exits with status 2, without a traceback. Every other
exception is a bug or an environment failure and keeps its traceback.

`MissingInputError` is the same error for a path that does not exist; it is also a
`FileNotFoundError`, as `UserInputError` is a `ValueError`, so callers that catch
the built-in kinds keep working.

`brief(e)` puts another library's exception into such a line (torch's run to several).
`check_count` is the one check of a count setting (steps, samples, documents, a seed):
a whole number, at least some least value, or one error line naming the setting.

This module imports nothing of the project, so every package may raise it.
"""

import numbers


class UserInputError(ValueError):
    """A user's input cannot be used; the message names it and the fix (one line)."""

    def __init__(self, message: str):
        # One line on the terminal: line breaks inside a message are folded.
        super().__init__(" ".join(str(message).split()))


class MissingInputError(UserInputError, FileNotFoundError):
    """A file or folder the user named does not exist (or holds nothing usable)."""


class ModelDirMismatchError(UserInputError):
    """MODEL_DIR holds work that another config built; nothing there was changed (`main.run`
    then puts back the config.gin it found)."""


class CheckpointMismatchError(ModelDirMismatchError):
    """A checkpoint in MODEL_DIR does not fit the run's config (shapes, dtypes, data layout)
    or was written by another kind of run; nothing on disk was changed."""


def check_count(setting: str, value: object, least: int = 1, note: str = "") -> None:
    """Refuses `value` for the count `setting` unless it is a whole number >= `least` (a
    bool, a float, a string and a number below are refused); `note` ends the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise UserInputError(f"{setting}={value!r}: give a whole number >= {least}{note}.")


def brief(e: BaseException, limit: int = 200) -> str:
    """Another library's exception on one line, for a message of ours: its type and its
    words, cut after a whole sentence when long (a cut at a fixed length ended mid-sentence)."""
    text = " ".join(str(e).split())
    if len(text) > limit:
        end = text[:limit].rfind(". ")
        text = text[:end + 1] if end > 0 else text[:limit].rstrip() + " ..."
    return f"{type(e).__name__}: {text}"
