"""Bad input: the project's one error type, and reading the files a user names.

Every public entry point refuses bad input (a missing file, malformed JSON, an unknown role, a wrong
shape, ...) with an `InputError` whose message names the file, key or value and what was expected.
The command line prints such an error as one line; any other exception is a bug and keeps its
traceback. `InputError` is a ValueError, and `MissingFileError` also a FileNotFoundError, so callers
that catch those keep working.

Every read of a file that a user names goes through `read_bytes`: the path must be a regular file
(a FIFO, a device such as /dev/zero, a folder or a symlink loop is refused by name, never opened, so
nothing hangs or reads forever) and no larger than a limit. JSON from a user or a file goes through
`parse_json`, which also refuses documents nested deeper than MAX_DEPTH before Python's parser recurses
into them (json_depth alone guards JSON that a model writes).
"""
import errno
import json
import os
import re
import stat
from pathlib import Path

MAX_DEPTH = 64                    # JSON / Python data nested deeper than this is refused
MAX_JSON_BYTES = 64 * 2**20       # params.json, config.json, --messages, --tools, ...
MAX_TEXT_BYTES = 16 * 2**20       # SYSTEM_PROMPT.txt, --system FILE


class InputError(ValueError):
    """Bad input from a user or a file: the message says what is wrong and where."""


class MissingFileError(InputError, FileNotFoundError):
    """A file or folder that the input names does not exist."""


# ----------------------------------------------------------------------------- files

def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _stat(path: Path, what: str) -> os.stat_result:
    try:
        return os.stat(path)   # follows symlinks, opens nothing
    except FileNotFoundError:
        raise MissingFileError(f"{what}: no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{what}: a symlink loop") from None
        raise InputError(f"{what}: cannot read it ({e.strerror or e})") from None


def regular_file(path, what: str | None = None) -> Path:
    """`path` if it names a regular file (through symlinks); else an InputError naming it. Nothing
    is opened, so a FIFO or a device is refused without blocking."""
    path = Path(path)
    what = what or str(path)
    mode = _stat(path, what).st_mode
    if not stat.S_ISREG(mode):
        raise InputError(f"{what}: is {_kind(mode)}, expected a regular file")
    return path


def read_bytes(path, limit: int, what: str | None = None) -> bytes:
    """The bytes of regular file `path`, refused if larger than `limit` bytes."""
    path = Path(path)
    what = what or str(path)
    regular_file(path, what)
    try:
        # O_NONBLOCK: should the path become a FIFO after the check, opening it does not wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise InputError(f"{what}: cannot read it ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{what}: is {_kind(info.st_mode)}, expected a regular file")
        if info.st_size > limit:
            raise InputError(f"{what}: {info.st_size} bytes, more than the limit of {limit}")
        data = f.read(info.st_size + 1)
        if len(data) > info.st_size:   # it grew since fstat: read on, to the limit
            data += f.read(limit + 1 - len(data))
    if len(data) > limit:
        raise InputError(f"{what}: more than the limit of {limit} bytes")
    return data


def read_text(path, limit: int | None = None, what: str | None = None) -> str:
    """The UTF-8 text of regular file `path` (at most `limit` bytes, default MAX_TEXT_BYTES)."""
    what = what or str(path)
    try:
        return read_bytes(path, limit or MAX_TEXT_BYTES, what).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what}: not UTF-8 text ({e})") from None


# ----------------------------------------------------------------------------- JSON

_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_STRING = re.compile(rb'"[^"]*"')
_INNERMOST = re.compile(rb"\[\]|\{\}")


def json_depth(data: bytes, limit: int = MAX_DEPTH) -> int:
    """The nesting depth of JSON text `data`, counting up to limit + 1 (a lower bound past that);
    linear, without recursion. In unbalanced text every bracket left open counts as one more level:
    the parser would recurse into each before it found the text malformed."""
    # Escaped backslashes, then escaped quotes, go first, so that every '"' left opens or closes a
    # string; then only quotes and brackets are kept, and the (bracket-only) strings dropped.
    skeleton = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    skeleton = _STRING.sub(b"", skeleton.replace(b'""', b""))
    for depth in range(limit + 1):
        if not skeleton:
            return depth
        skeleton, removed = _INNERMOST.subn(b"", skeleton)
        if not removed:
            return min(depth + skeleton.count(b"[") + skeleton.count(b"{"), limit + 1)
    return limit + 1


def parse_json(data: bytes | str, what: str):
    """The JSON document in `data` (UTF-8 bytes or text); `what` names it in errors."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if json_depth(raw) > MAX_DEPTH:
        raise InputError(f"{what}: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(raw.decode("utf-8") if isinstance(data, bytes) else data)
    except ValueError as e:  # invalid JSON or invalid UTF-8
        raise InputError(f"{what}: not valid JSON ({e})") from None


def read_json(path: Path, what: str | None = None, limit: int | None = None):
    """The JSON document in regular file `path` (at most `limit` bytes, default MAX_JSON_BYTES);
    `what` names it in errors (default: the path)."""
    what = what or str(path)
    return parse_json(read_bytes(path, limit or MAX_JSON_BYTES, what), what)


def check_depth(value, what: str, limit: int = MAX_DEPTH) -> None:
    """Refuse Python data (dicts, lists, tuples) nested deeper than `limit`; data that holds itself
    is nested without bound. Linear: a container shared by several parents is walked again only
    when met deeper than before."""
    stack, deepest = [(value, 1)], {}
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list, tuple)) or deepest.get(id(item), 0) >= depth:
            continue
        if depth > limit:
            raise InputError(f"{what}: nested deeper than {limit} levels (or holds itself)")
        deepest[id(item)] = depth
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
