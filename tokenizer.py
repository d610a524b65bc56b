"""Tokenizers of Mistral models, exact to the id.

Mistral Small 3.x uses Tekken: byte-level BPE run by tiktoken, described by a `tekken.json` file.
Older Mistral models use SentencePiece `.model` files (tokenizer versions v1, v2, v3 and
v7). Both sit behind one interface, `Tokenizer.from_file(path)`, and give the same ids as
mistral-common, the official library (tests/test_tokenizer.py checks this).

Text is never parsed for control tokens. A user who types "[INST]" gets the ordinary pieces
"[", "INST", "]": a control token can enter a sequence only by its id, which the chat code
looks up with `special_id("[INST]")`. This keeps user text from forging turns or images.

Tekken id layout (vocabulary of n_words ids):
    [0, n_special)          special tokens: <unk> <s> </s> [INST] [/INST] ... then reserved fillers
    [n_special, n_words)    regular tokens: id = n_special + rank, rank = the token's BPE merge rank;
                            ranks 0..255 are the 256 single bytes, so every text has an encoding
"""
import base64
import functools
import operator
import re
from collections import Counter
from dataclasses import astuple, dataclass
from itertools import groupby
from pathlib import Path

import sentencepiece
import tiktoken

from inputs import InputError, parse_json, read_bytes, read_json

DECODE_POLICIES = ("ignore", "keep", "raise")  # what decode does with special tokens
MAX_TOKENIZER_BYTES = 256 * 2**20        # tekken.json is 15-20 MB, a SentencePiece model 0.5 MB
TEKKEN_VERSIONS = ("v3", "v7", "v11", "v13")
SENTENCEPIECE_VERSIONS = ("v1", "v2", "v3", "v7")

# The pre-tokenizer pattern of every official tekken.json (v3 to v13). Text is cut into pieces by it,
# then each piece is BPE-encoded on its own.
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
                  r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# \s of tiktoken's regex engine: the Unicode White_Space characters (fixed since Unicode 6.3).
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
LONG_BLANKS = 1000   # a run of blanks from this length on is cut out of the text before tiktoken sees it

# A tekken.json of version v7 or below may lack its special_tokens list: then these are ids 0..19.
BUILTIN_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)


@dataclass
class ImageConfig:
    patch_size: int          # pixels per side of one vision patch (14 for Small 3.x)
    max_image_size: int      # longest image side in pixels before downscaling (1540)
    spatial_merge_size: int  # patches merged per side into one image token (2; 1 = no merging)


class Tokenizer:
    """The common interface. `from_file` returns a Tekken or a SentencePiece tokenizer."""

    version: str     # "v3", "v7", "v11", "v13" (Tekken) or "v1", "v2", "v3", "v7" (SentencePiece)
    n_words: int     # vocabulary size, special tokens included
    bos_id: int
    eos_id: int
    pad_id: int      # -1 where the file defines no padding token (SentencePiece files)
    unk_id: int
    image: ImageConfig | None = None
    leading_space = False    # decode drops one space at the start of a text (SentencePiece's dummy prefix)
    _specials: dict[int, str]       # id -> name of every special token
    _special_ids: dict[str, int]    # name -> id

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        path = Path(path)
        data = read_bytes(path, MAX_TOKENIZER_BYTES, f"tokenizer file {path}")   # a FIFO is never opened
        if path.suffix == ".json" or data[:64].lstrip().startswith(b"{"):
            return Tekken(path, parse_json(data, str(path)))
        if ".model" in path.name:
            return SentencePiece(path, data)
        raise InputError(f"{path}: not a tokenizer file; expected a tekken.json or a "
                         "SentencePiece tokenizer.model[.vN]")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self._encode(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, special: str = "ignore") -> str:
        """Text of `ids`; special tokens are dropped ("ignore"), named ("keep") or refused ("raise")."""
        if special not in DECODE_POLICIES:
            raise InputError(f"special must be one of {DECODE_POLICIES}, got {special!r}")
        ids = self._checked(ids)
        if special == "raise":
            found = next((i for i in ids if i in self._specials), None)
            if found is not None:
                raise InputError(f"decode(special='raise'): id {found} is the special token "
                                 f"{self._specials[found]}")
        return self._decode(ids, keep=special == "keep")

    def special_id(self, name: str) -> int:
        if name not in self._special_ids:
            raise InputError(f"unknown special token {name!r} (tokenizer {self.version})")
        return self._special_ids[name]

    def special_name(self, id: int) -> str:
        (id,) = self._checked([id])
        if id not in self._specials:
            raise InputError(f"id {id} is a regular token, not a special token")
        return self._specials[id]

    def is_special(self, id: int) -> bool:
        (id,) = self._checked([id])
        return id in self._specials

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes of one token (b"" for a special token). A streaming printer joins these and
        decodes them incrementally, so a character split across tokens comes out whole (less the
        first space where `leading_space`)."""
        (id,) = self._checked([id])
        return b"" if id in self._specials else self._token_bytes(id)

    def _set_specials(self, names: dict[int, str]) -> None:
        self._specials = names
        self._special_ids = {name: id for id, name in names.items()}

    def _checked(self, ids) -> list[int]:
        try:
            ids = [operator.index(i) for i in ids]  # accepts numpy and torch integers too
        except TypeError:
            raise TypeError(f"token ids must be integers, got {ids!r:.100}") from None
        if ids and (min(ids) < 0 or max(ids) >= self.n_words):
            bad = next(i for i in ids if not 0 <= i < self.n_words)
            raise InputError(f"token id {bad} is out of range: this tokenizer has n_words={self.n_words} "
                             f"(ids 0..{self.n_words - 1})")
        return ids


class Tekken(Tokenizer):
    """Tekken (tekken.json): tiktoken BPE over UTF-8 bytes, ids laid out as in the module docstring.
    data: the tekken.json document, when it is already read (from_file) or made (gguf_file rebuilds one
    from a GGUF's tokenizer.ggml.* keys)."""

    def __init__(self, path: Path, data: dict | None = None):
        path = Path(path)
        data = read_json(path, limit=MAX_TOKENIZER_BYTES) if data is None else data
        if not (isinstance(data, dict) and isinstance(data.get("config"), dict)
                and isinstance(data.get("vocab"), list)):
            raise InputError(f"{path}: not a Tekken file (expected a JSON object with 'config' and 'vocab')")
        config = data["config"]
        self.version = config.get("version")
        if self.version not in TEKKEN_VERSIONS:
            raise InputError(f"{path}: unknown Tekken version {self.version!r}; "
                             f"expected one of {', '.join(TEKKEN_VERSIONS)}")
        pattern = _config_value(config, "pattern", str, path)
        self.n_words = _config_value(config, "default_vocab_size", int, path)
        n_special = _config_value(config, "default_num_special_tokens", int, path)
        if not 0 < n_special <= self.n_words - 256:
            raise InputError(f"{path}: default_num_special_tokens={n_special} leaves no room for the 256 "
                             f"byte tokens in default_vocab_size={self.n_words}")

        names = _tekken_specials(data.get("special_tokens"), self.version, n_special, path)
        missing = [name for name in ("<unk>", "<s>", "</s>", "<pad>") if name not in names]
        if missing:
            raise InputError(f"{path}: special_tokens lacks {missing}")
        self._set_specials(dict(enumerate(names)))
        self.bos_id, self.eos_id = self.special_id("<s>"), self.special_id("</s>")
        self.pad_id, self.unk_id = self.special_id("<pad>"), self.special_id("<unk>")
        self.image = _image_config(data, self.version, path)

        # The file may hold more tokens than the model uses: only the first n_words - n_special count.
        ranks = _tekken_ranks(data["vocab"], n_special, self.n_words - n_special, path)
        # tiktoken only compares ranks, so handing it ranks already shifted by n_special makes
        # its output our ids directly.
        self._pattern, self._path = pattern, path
        try:
            self._bpe = tiktoken.Encoding(path.name, pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens={})
        except ValueError as e:
            raise InputError(f"{path}: config['pattern'] is not a valid regular expression ({e})") from None

    def _encode(self, text: str) -> list[int]:
        # encode_ordinary never matches special tokens in text. tiktoken turns lone surrogates,
        # which have no UTF-8 form, into U+FFFD (as mistral-common, which calls it too).
        if self._pattern != TEKKEN_PATTERN or len(text) < LONG_BLANKS:
            return self._encode_ordinary(text)
        # tiktoken's regex engine overflows its stack on \s+(?!\S) over a run of about a million
        # blanks (a Rust panic, for mistral-common too). The piece that this alternative would make
        # of a long run is cut out here and BPE-encoded directly: the same ids (long_blank_pieces).
        ids, start = [], 0
        for begin, end in long_blank_pieces(text):
            ids += self._encode_ordinary(text[start:begin])
            ids += self._bpe._encode_single_piece(text[begin:end])
            start = end
        return ids + self._encode_ordinary(text[start:]) if start else self._encode_ordinary(text)

    def _encode_ordinary(self, text: str) -> list[int]:
        try:
            return self._bpe.encode_ordinary(text)
        except BaseException as e:   # a Rust panic is a pyo3 PanicException, not an Exception
            if type(e).__name__ != "PanicException":
                raise
            raise InputError(f"text of {len(text)} characters: tiktoken fails on it with the pattern of "
                             f"{self._path} ({str(e)[:100]})") from None

    def _decode(self, ids: list[int], keep: bool) -> str:
        # Each run of regular tokens is decoded on its own, as mistral-common does: the bytes of one
        # character split by a special token become U+FFFD, like any invalid UTF-8.
        parts = []
        for special, run in groupby(ids, key=self._specials.__contains__):
            if not special:
                parts.append(self._bpe.decode(list(run)))
            elif keep:
                parts.extend(self._specials[id] for id in run)
        return "".join(parts)

    def _token_bytes(self, id: int) -> bytes:
        return self._bpe.decode_single_token_bytes(id)


class SentencePiece(Tokenizer):
    """SentencePiece (.model files of the v1, v2, v3 and v7 Mistral tokenizers). Its control
    pieces are the special tokens: <s> and </s>, from v2 on also [INST], [/INST], ..."""

    leading_space = True

    def __init__(self, path: Path, data: bytes | None = None):
        path = Path(path)
        self.version = _sentencepiece_version(path)
        data = read_bytes(path, MAX_TOKENIZER_BYTES) if data is None else data
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError) as e:
            raise InputError(f"{path}: not a SentencePiece model ({e})") from None
        sp = self._sp
        self.n_words = sp.get_piece_size()
        self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
        self.pad_id, self.unk_id = sp.pad_id(), sp.unk_id()
        self._set_specials({id: sp.id_to_piece(id) for id in range(self.n_words) if sp.is_control(id)})

    def _encode(self, text: str) -> list[int]:
        # Passing UTF-8 bytes makes a lone surrogate fail here with a clear UnicodeEncodeError
        # (a ValueError) rather than deep in SentencePiece's C++ binding.
        return self._sp.encode(text.encode("utf-8"))

    def _decode(self, ids: list[int], keep: bool) -> str:
        if keep:
            # As mistral-common: every token shown as its raw piece ("▁Hello", "<0x0A>", "[INST]").
            return "".join(map(self._sp.id_to_piece, ids))
        # SentencePiece drops control tokens, turns "▁" into spaces and removes the space it put
        # in front of the text when encoding; <unk> prints as " ⁇ ".
        return self._sp.decode(ids)

    def _token_bytes(self, id: int) -> bytes:
        piece = self._sp.id_to_piece(id)
        if self._sp.is_byte(id):
            return bytes([int(piece[1:-1], 16)])  # "<0xE2>" -> b"\xe2"
        if self._sp.is_unknown(id):
            return " \u2047 ".encode("utf-8")
        return piece.replace("\u2581", " ").encode("utf-8")


def _is_int(value) -> bool:
    """An integer of the JSON file: true and false are not (bool is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


@functools.cache
def _blank_runs(min_length: int) -> re.Pattern:
    """Runs of at least min_length (>= 2) White_Space characters. The lookbehind lets a match start
    only at a run's first blank, so that finding them stays linear; it comes after the first blank,
    so that the regex engine skips to blanks at C speed (4 ms per MB of mixed text)."""
    blank = f"[{WHITE_SPACE}]"
    return re.compile(f"{blank}(?<!{blank}{blank}){blank}{{{min_length - 1},}}")


def long_blank_pieces(text: str, min_length: int | None = None):
    r"""(begin, end) of each piece that TEKKEN_PATTERN makes of a long run of blanks: the blanks after
    a run's last line break (the whole run if it has none), at least min_length of them, but the last
    one when text goes on after the run (\s+(?!\S) leaves it to the next piece). Why these are
    pieces of the pattern, whatever surrounds them:
    - no piece goes on past `begin`: a piece that reaches a line break ends after the last one of
      its run ([\r\n/]* and \s*[\r\n]+ stop there), and none goes from a non-blank into blanks;
    - at `begin` the alternatives before \s+(?!\S) fail (no letter, digit or line break follows), and
      \s+(?!\S) takes the run but its last blank if a non-blank follows;
    - nothing in the pattern looks behind, and nothing before `begin` looks past it (the blank at
      `begin` and the end of a text read alike to every alternative that can stop there).
    So encoding the text around the pieces on its own and each piece as one BPE piece gives the ids
    of the whole text (tests/test_bad_input.py checks it with min_length 2 on the tokenizer corpus)."""
    min_length = min_length or LONG_BLANKS
    for run in _blank_runs(min_length).finditer(text):
        begin, end = run.span()
        begin += max(run.group().rfind("\r"), run.group().rfind("\n")) + 1
        end -= end < len(text)
        if end - begin >= min_length:
            yield begin, end


def _config_value(config: dict, key: str, kind: type, path: Path):
    value = config.get(key)
    if not isinstance(value, kind) or (kind is int and not _is_int(value)):
        raise InputError(f"{path}: config[{key!r}] must be of type {kind.__name__}, got {value!r:.100}")
    return value


def _tekken_specials(listed, version: str, n_special: int, path: Path) -> list[str]:
    """Names of the n_special special tokens, in id order."""
    if listed is None:
        if int(version[1:]) > 7:
            raise InputError(f"{path}: a {version} tekken.json must list its special_tokens")
        names = list(BUILTIN_SPECIALS)
    elif isinstance(listed, list):
        names = []
        for i, entry in enumerate(listed):
            if not (isinstance(entry, dict) and _is_int(entry.get("rank")) and entry["rank"] == i
                    and isinstance(entry.get("token_str"), str)):
                raise InputError(f"{path}: special_tokens[{i}] must be {{'rank': {i}, 'token_str': ...}}, "
                                 f"got {entry!r:.100}")
            names.append(entry["token_str"])
    else:
        raise InputError(f"{path}: special_tokens must be a list, got {listed!r:.100}")
    if len(names) > n_special:
        raise InputError(f"{path}: {len(names)} special tokens, more than "
                         f"default_num_special_tokens={n_special}")
    names += [f"<SPECIAL_{i}>" for i in range(len(names), n_special)]  # reserved ids
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise InputError(f"{path}: special token names must be unique; repeated: {repeated}")
    return names


def _tekken_ranks(vocab: list, n_special: int, n_regular: int, path: Path) -> dict[bytes, int]:
    """Map the bytes of each of the first n_regular vocabulary entries to its id."""
    if len(vocab) < n_regular:
        raise InputError(f"{path}: vocab has {len(vocab)} entries, fewer than the {n_regular} declared "
                         "(default_vocab_size - default_num_special_tokens)")
    ranks, first = {}, {}
    for rank, entry in enumerate(vocab[:n_regular]):
        try:
            # validate: junk characters are an error, not silently dropped
            token = base64.b64decode(entry["token_bytes"], validate=True)
            listed_rank = entry["rank"]
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: vocab[{rank}] is malformed ({e!r}): {entry!r:.100}") from None
        if not _is_int(listed_rank) or listed_rank != rank:
            raise InputError(f"{path}: vocab[{rank}] has rank {listed_rank!r}; ranks must run 0, 1, 2, ...")
        if token in first:
            raise InputError(f"{path}: vocab[{first[token]}] and vocab[{rank}] hold the same token bytes "
                             f"{token!r:.60}; the vocab lists the same token bytes twice")
        first[token] = rank
        ranks[token] = n_special + rank
    if any(ranks.get(bytes([b])) != n_special + b for b in range(256)):
        raise InputError(f"{path}: vocab must start with the 256 single bytes 0x00..0xff in order")
    return ranks


def _image_config(data: dict, version: str, path: Path) -> ImageConfig | None:
    # "multimodal" is the legacy name of the "image" section, allowed up to v11 (as mistral-common).
    if data.get("multimodal") and int(version[1:]) > 11:
        raise InputError(f"{path}: a {version} tekken.json must call its image section 'image', "
                         "not 'multimodal'")
    section = data.get("multimodal") or data.get("image")
    if not section:
        return None
    if not isinstance(section, dict) or not {"image_patch_size", "max_image_size"} <= section.keys():
        raise InputError(f"{path}: the image section needs image_patch_size and max_image_size, "
                         f"got {section!r:.100}")
    # Files for models without patch merging (Pixtral 12B) omit spatial_merge_size: it is 1.
    merge = section.get("spatial_merge_size", 1)
    image = ImageConfig(section["image_patch_size"], section["max_image_size"], merge)
    if not all(_is_int(v) and v > 0 for v in astuple(image)):
        raise InputError(f"{path}: image sizes must be positive integers, got {section!r:.100}")
    return image


def _sentencepiece_version(path: Path) -> str:
    # The version is in the file name: tokenizer.model.v3, ...model.v7m1 (m1: its image variant);
    # a bare tokenizer.model is the v1 tokenizer.
    match = re.fullmatch(r".+\.model(?:\.(v\d+)(?:m\d+)?)?", path.name)
    if match is None:
        raise InputError(f"{path}: a SentencePiece file name must end in .model or .model.vN "
                         "(e.g. tokenizer.model.v3)")
    version = match.group(1) or "v1"
    if version not in SENTENCEPIECE_VERSIONS:
        raise InputError(f"{path}: unknown SentencePiece tokenizer version {version!r}; "
                         f"expected one of {', '.join(SENTENCEPIECE_VERSIONS)}")
    return version
