"""Bad input: the project's one error type, and reading the files a user names.

Every public entry point refuses bad input (a missing file, malformed JSON, an unknown role, a wrong
shape, ...) with an `InputError` whose message names the file, key or value and what was expected.
The command line prints such an error as one line; any other exception is a bug and keeps its
traceback. `InputError` is a ValueError, and `MissingFileError` also a FileNotFoundError, so callers
that catch those keep working.
"""
import json
from pathlib import Path


class InputError(ValueError):
    """Bad input from a user or a file: the message says what is wrong and where."""


class MissingFileError(InputError, FileNotFoundError):
    """A file or folder that the input names does not exist."""


def read_json(path: Path, what: str | None = None):
    """The JSON document in `path`; `what` names it in errors (default: the path)."""
    what = what or str(path)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFileError(f"{what}: no such file") from None
    except ValueError as e:  # invalid JSON or invalid UTF-8
        raise InputError(f"{what}: not valid JSON ({e})") from None
    except OSError as e:  # a folder, no permission, ...
        raise InputError(f"{what}: cannot read it ({e.strerror or e})") from None
