"""The header of a GGUF file (llama.cpp's format): its metadata and tensor infos, read without the tensors.

    "GGUF" | version u32 | n_tensors u64 | n_kv u64 | n_kv x (key, value type u32, value)
           | n_tensors x (name, n_dims u32, ne u64 x n_dims, ggml type u32, offset u64)
           | padding to general.alignment (32) | the tensors' data, at their offsets
    string = length u64 + UTF-8 bytes; array = item type u32 + count u64 + items

Parsed here with struct over a memory map rather than with the gguf package's GGUFReader, which takes
11 s to open a file with the whole vocabulary (it builds a numpy view per string); tests/test_gguf.py and
tests/test_chat_template.py check this parser against GGUFReader. Both byte orders are read: a version
that reads as a huge number is the other order. This module knows nothing of the model: gguf_file.py maps
the tensors onto it, chat_template.py reads the `tokenizer.chat_template` string.
"""
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inputs import MAX_DEPTH, InputError, regular_file

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9   # the two value types that are read apart


@dataclass
class RawTensor:
    name: str
    ne: list[int]      # the sizes, innermost first (ggml's order: [in, out] for a matrix)
    type_id: int       # a ggml type id (gguf.GGMLQuantizationType)
    offset: int        # absolute byte offset of its data in the file


@dataclass
class Header:
    path: Path
    byte_order: str    # "<" little-endian (nearly every file), ">" big-endian
    metadata: dict
    tensors: list[RawTensor]
    size: int          # the file's size in bytes


class _Cursor:
    """Reads through the mapped file in one byte order; a length past the end is an error, so a
    corrupt header never allocates more than the file holds."""

    def __init__(self, buf, path: Path, order: str):
        self.buf, self.pos, self.path, self.order = buf, 0, path, order

    def scalar(self, fmt: str):
        size = struct.calcsize(fmt)
        self._check(size)
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        self._check(n)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        # GGUF strings are UTF-8; a token of an odd vocabulary may still hold other bytes.
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int, depth: int = 0):
        if kind in SCALARS:
            return self.scalar(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            if depth >= MAX_DEPTH:
                raise InputError(f"{self.path}: GGUF arrays nested deeper than {MAX_DEPTH} levels at byte {self.pos}")
            item, n = self.scalar("I"), self.scalar("Q")
            if item in SCALARS and item != 7:   # numbers in one read (a vocabulary's scores, token types)
                fmt = np.dtype(self.order + SCALARS[item])
                self._check(n * fmt.itemsize)
                values = np.frombuffer(self.buf, fmt, n, self.pos).tolist()
                self.pos += n * fmt.itemsize
                return values
            return [self.value(item, depth + 1) for _ in range(n)]
        raise InputError(f"{self.path}: unknown GGUF value type {kind} at byte {self.pos}")

    def _check(self, n: int) -> None:
        if n > len(self.buf) - self.pos:
            raise InputError(f"{self.path}: the GGUF header is truncated or malformed (a read of {n} bytes at byte "
                             f"{self.pos} runs past the end); is the download complete?")


def read_header(path) -> Header:
    """The metadata and tensor infos of one GGUF file (nothing of the tensor data is read)."""
    path = regular_file(path, f"GGUF file {path}")
    try:
        return _parse(path)
    except OSError as e:   # no permission, an I/O error
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None


def _parse(path: Path) -> Header:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"{path}: not a GGUF file (it does not start with b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            c = _Cursor(buf, path, "<")
            c.pos = 4
            version = c.scalar("I")
            if version >= 1 << 16:   # a big-endian file
                c.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
            n_tensors, n_kv = c.scalar("Q"), c.scalar("Q")
            if version not in (2, 3):
                raise InputError(f"{path}: GGUF version {version} is not supported (2 or 3)")
            metadata = {}
            for _ in range(n_kv):
                key = c.string()
                metadata[key] = c.value(c.scalar("I"))
            raw = []
            for _ in range(n_tensors):
                name = c.string()
                ne = [c.scalar("Q") for _ in range(c.scalar("I"))]
                raw.append((name, ne, c.scalar("I"), c.scalar("Q")))
            align = metadata.get("general.alignment", 32)
            if not isinstance(align, int) or isinstance(align, bool) or align < 1:
                raise InputError(f"{path}: general.alignment is {align!r:.40}; expected a positive integer")
            start = -(-c.pos // align) * align   # the data begins at the next multiple of the alignment
            size = len(buf)
    tensors = [RawTensor(name, ne, type_id, start + offset) for name, ne, type_id, offset in raw]
    return Header(path, c.order, metadata, tensors, size)
