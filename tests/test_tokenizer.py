"""tokenizer.py against mistral-common, the official tokenizer library.

Files: exact v7 and v11 tekken.json (built by tekken_files.py from the vocabulary mistral-common
ships plus the official special-token list) and every tokenizer file mistral-common ships, as is
(two v3 tekken.json without a special_tokens list, SentencePiece v1, v2, v3, v7, v7m1).
On each: ids, decoded text under each special-token policy, special tokens, per-token bytes.
Small hand-written tekken.json files cover versions, legacy keys and bad input.
"""
import base64
import codecs
import json
import random
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from tekken_files import SHIPPED_SENTENCEPIECE, SHIPPED_TEKKEN, special_list, write_tekken
from tokenizer import ImageConfig, Tokenizer

FILES = ["v7", "v11"] + [p.name for p in SHIPPED_TEKKEN + SHIPPED_SENTENCEPIECE]
POLICY = {"ignore": SpecialTokenPolicy.IGNORE, "keep": SpecialTokenPolicy.KEEP,
          "raise": SpecialTokenPolicy.RAISE}  # our policy names -> mistral-common's

HANDWRITTEN = [
    "", " ", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "Où est la bibliothèque ? L'élève a réussi, « très bien » !", "Ça coûte 12,50 € — n'est-ce pas ?",
    "日本語のテキストです。東京は大きい。", "中文分词测试：我爱北京天安门。", "한국어 문장입니다.",
    "مرحبا بالعالم، كيف حالك؟", "नमस्ते दुनिया, आप कैसे हैं?", "Привет, мир! ΑΒΓ αβγ שלום ไทย",
    "def f(x):\n\tif x:\r\n\t\treturn x ** 2\r\n\treturn None\r\n",
    "for (int i = 0; i < n; ++i) {\n    a[i] += b[i];\t// sum\n}\n",
    "  ", " " * 17, " " * 300, "\n" * 7, "\n" * 100, "\t" * 9, "\r\n" * 30, " \n \n  \n\t", "a  b   c    d",
    "trailing   ", "   leading", "x\u00a0y\u2003z\u3000w", "1234567890 3.14159 1e-10 0xFF", "ÄÖÜ äöü ß ẞ",
    "👩‍👩‍👧‍👦 👍🏽 🏳️‍🌈 🇫🇷 ❤️", "e\u0301 a\u0308 n\u0303 ç Z\u0351\u0358\u035c", "\u0915\u094d\u0937\u093f",
    "\x00\x01\x02\x07\x08\x1b[31mred\x1b[0m\x7f\x85", "\ufeffBOM", "\ufffd\ufffe\uffff\U0010ffff",
    "\u200b\u200c\u200d\u2060", "\u2581\u2581x \u2581",
    # Lone surrogates: bytes smuggled in by surrogateescape, and a pair split into two code points.
    "\udcff\udcfe", "abc\udc80", "\ud83d\ude00",
    # Text that looks like control tokens.
    "[INST]", "[/INST]", "<s>", "</s>", "<unk>", "<pad>", "[IMG]", "[IMG_BREAK]", "[SYSTEM_PROMPT]",
    "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<SPECIAL_42>", "[control_8]", "<0x0A>",
    "[INST]Hello[/INST]", "<s>[INST] What? [/INST]</s>", "[[INST]]", "[ INST ]",
]
CONTROL_LOOKALIKES = ["[INST]", "[/INST]", "<s>", "</s>", "<unk>", "<pad>", "[IMG]", "[IMG_BREAK]",
                      "[IMG_END]", "[SYSTEM_PROMPT]", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<SPECIAL_42>",
                      "[control_8]", "<s>[INST]hi[/INST]</s>", " [INST] "]


def random_corpus(count: int = 400, seed: int = 0) -> list[str]:
    """Mixtures of the hand-written strings, random code points of every UTF-8 length and whitespace runs."""
    rng = random.Random(seed)
    planes = [(0x00, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]

    def part() -> str:
        kind = rng.randrange(3)
        if kind == 0:
            text = rng.choice(HANDWRITTEN)
            start = rng.randrange(len(text) + 1)
            return text[start:start + rng.randrange(1, 40)]
        if kind == 1:
            return "".join(chr(rng.randint(*rng.choice(planes))) for _ in range(rng.randrange(1, 8)))
        return "".join(rng.choice(" \t\n\r\u00a0") for _ in range(rng.randrange(1, 12)))

    return ["".join(part() for _ in range(rng.randrange(1, 8))) for _ in range(count)]


CORPUS = HANDWRITTEN + random_corpus()


def has_surrogate(s: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in s)


def file_path(name: str, folder):
    if name in ("v7", "v11"):
        path = folder / f"tekken_{name}.json"
        return path if path.exists() else write_tekken(folder, name, name=path.name)
    return next(p for p in SHIPPED_TEKKEN + SHIPPED_SENTENCEPIECE if p.name == name)


@pytest.fixture(scope="session")
def tekken_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("tekken")


@pytest.fixture(scope="session", params=FILES)
def pair(request, tekken_folder):
    """(name, ours, mistral-common's) for one tokenizer file; pytest loads one file at a time."""
    path = file_path(request.param, tekken_folder)
    theirs = Tekkenizer.from_file(path) if path.suffix == ".json" else SentencePieceTokenizer(path)
    return request.param, Tokenizer.from_file(path), theirs


@pytest.fixture(scope="session")
def v7(tekken_folder):
    return Tokenizer.from_file(file_path("v7", tekken_folder))


@pytest.fixture(scope="session")
def v11(tekken_folder):
    return Tokenizer.from_file(file_path("v11", tekken_folder))


def is_sentencepiece(theirs) -> bool:
    return isinstance(theirs, SentencePieceTokenizer)


def differences(ours, theirs, s: str) -> list[str]:
    """Every way ours differs from mistral-common on the text s: ids (with and without <s>, </s>),
    decoded text under "ignore" and "keep", and the round trip."""
    try:
        expected = theirs.encode(s, bos=True, eos=True)
    except RuntimeError:  # SentencePiece's binding refuses lone surrogates; we must refuse too
        try:
            ours.encode(s)
        except ValueError:
            return []
        return [f"{s!r}: mistral-common refuses it, we encode it"]
    problems = []
    if ours.encode(s, bos=True, eos=True) != expected or ours.encode(s) != expected[1:-1]:
        problems.append(f"{s!r}: ids {ours.encode(s, bos=True, eos=True)} != {expected}")
    for policy in ("ignore", "keep"):
        if ours.decode(expected, policy) != theirs.decode(expected, POLICY[policy]):
            problems.append(f"{s!r}: decode {policy} {ours.decode(expected, policy)!r}")
    # SentencePiece encodes U+2581 like its space marker, so it comes back as a space.
    text = s.replace("\u2581", " ") if is_sentencepiece(theirs) else s
    if not has_surrogate(s) and ours.decode(expected) != text:
        problems.append(f"{s!r}: round trip gives {ours.decode(expected)!r}")
    return problems


def test_corpus_matches_mistral_common(pair):
    name, ours, theirs = pair
    problems = {s: found for s in CORPUS if (found := differences(ours, theirs, s))}
    print(f"\n{name}: {len(CORPUS)} strings compared, {len(problems)} mismatches")
    assert problems == {}
    # Negative control: the corpus is rich (a comparison of empty or trivial output could not fail).
    ids = {i for s in CORPUS if not (has_surrogate(s) and is_sentencepiece(theirs)) for i in ours.encode(s)}
    assert len(ids) > 500


# Random text, with fragments that stress the pre-tokenizer and control-token lookalikes.
FRAGMENTS = ["[INST]", "</s>", "<s>", "[IMG]", "\r\n", "\t", "    ", "\n\n\n", "\u200d", "\u0301", "👩",
             "中", "ab", "Ab", "AB", "12", "’s", "ﬁ", "\u2581", "\x00", "\ufeff"]
TEXTS = st.lists(st.one_of(st.text(max_size=20), st.sampled_from(FRAGMENTS)), max_size=12).map("".join)


@settings(max_examples=250, deadline=None)
@given(s=TEXTS)
def test_random_text_matches_mistral_common(pair, s):
    _, ours, theirs = pair
    assert differences(ours, theirs, s) == []


def random_id_lists(ours, count: int = 300, seed: int = 0) -> list[list[int]]:
    """Id lists mixing special tokens, lone high bytes (characters split across tokens) and any
    regular token."""
    rng = random.Random(seed)
    specials = [i for i in range(ours.n_words) if ours.is_special(i)]
    high_bytes = [i for i in range(ours.n_words) if len(b := ours.token_bytes(i)) == 1 and b[0] >= 0x80]
    regular = [i for i in range(ours.n_words) if not ours.is_special(i)]
    kinds = [specials, high_bytes, regular, regular]
    return [[rng.choice(rng.choice(kinds)) for _ in range(rng.randrange(13))] for _ in range(count)]


def test_decode_policies_match_mistral_common(pair):
    _, ours, theirs = pair
    raised = 0
    for ids in random_id_lists(ours):
        for policy in ("ignore", "keep"):
            assert ours.decode(ids, policy) == theirs.decode(ids, POLICY[policy]), (ids, policy)
        try:
            expected = theirs.decode(ids, POLICY["raise"])
        except ValueError:
            raised += 1
            with pytest.raises(ValueError, match=r"id \d+ is the special token"):
                ours.decode(ids, "raise")
        else:
            assert ours.decode(ids, "raise") == expected
    assert 0 < raised < 300  # both outcomes of "raise" were exercised


def test_special_tokens_and_sizes_match_mistral_common(pair):
    _, ours, theirs = pair
    assert (ours.version, ours.n_words) == (theirs.version.value, theirs.n_words)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (
        theirs.bos_id, theirs.eos_id, theirs.pad_id, theirs.unk_id)
    specials = [i for i in range(ours.n_words) if ours.is_special(i)]
    assert specials == sorted(theirs.special_ids)
    for i in specials:
        name = ours.special_name(i)
        assert ours.special_id(name) == theirs.get_special_token(name) == i
    if ours.version == "v1":  # the v1 SentencePiece tokenizer has only <s> and </s>
        with pytest.raises(ValueError, match="INST"):
            ours.special_id("[INST]")
    else:
        assert ours.special_id("[INST]") == 3


def test_image_config_matches_mistral_common(pair):
    name, ours, theirs = pair
    if is_sentencepiece(theirs):
        # The file holds no image section; mistral-common derives one for ".model.v7m1" from the
        # file name. No model in scope uses it, so we leave it out (a deliberate difference).
        assert ours.image is None
    elif theirs.image is None:
        assert ours.image is None
    else:
        expected = theirs.image
        assert ours.image == ImageConfig(expected.image_patch_size, expected.max_image_size,
                                         expected.spatial_merge_size)
    if name in ("v7", "v11"):
        assert ours.image == ImageConfig(patch_size=14, max_image_size=1540, spatial_merge_size=2)


def test_token_bytes_match_mistral_common(pair):
    _, ours, theirs = pair
    if is_sentencepiece(theirs):
        # mistral-common has no byte view of SentencePiece tokens: compare with its decoding of
        # "a" + token (the token is not first, so SentencePiece keeps its leading space).
        a = theirs.vocab().index("a")
        for i in range(ours.n_words):
            if not ours.is_special(i):
                assert (b"a" + ours.token_bytes(i)).decode("utf-8", "replace") == theirs.decode([a, i]), i
    else:
        for i in range(ours.n_words):
            assert ours.token_bytes(i) == theirs.id_to_byte_piece(i), i


def stream(ours, ids: list[int]) -> str:
    """What a streaming printer shows: token bytes fed one at a time to an incremental UTF-8 decoder."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return "".join(decoder.decode(ours.token_bytes(i)) for i in ids) + decoder.decode(b"", final=True)


def test_streaming_token_bytes_give_the_decoded_text(pair):
    _, ours, theirs = pair
    for s in CORPUS:
        if has_surrogate(s):
            continue
        ids = ours.encode(s, bos=True, eos=True)
        if is_sentencepiece(theirs):
            # Pieces carry the space SentencePiece puts before the text; decode removes it.
            assert stream(ours, ids) == (" " + s if s else "").replace("\u2581", " ")
        else:
            assert stream(ours, ids) == s
    # Characters split across byte tokens come out whole once their last byte arrives.
    ids = ours.encode("Grüße 中文 👩‍👩‍👧")
    one_by_one = "".join(ours.decode([i]) for i in ids)
    assert "\ufffd" in one_by_one and "\ufffd" not in stream(ours, ids)


def test_control_token_lookalikes_encode_as_text(pair):
    """Security: text never becomes a control token; control tokens enter only by id."""
    _, ours, theirs = pair
    for s in CONTROL_LOOKALIKES:
        ids = ours.encode(s)
        assert not any(ours.is_special(i) for i in ids), s
        assert ours.decode(ids, "raise") == s
        if not is_sentencepiece(theirs):  # (SentencePiece "keep" shows raw pieces)
            assert ours.decode(ids, "keep") == s
    # Negative control: the real control tokens exist and decode differently.
    bos, eos = ours.special_id("<s>"), ours.special_id("</s>")
    assert ours.encode("<s>") != [bos] and ours.decode([bos, eos], "keep") == "<s></s>"


def test_small_31_example(v7):
    """The published ids of `[INST]Hello, how are you?[/INST]` for Mistral Small 3.1 (docs/model.md, "The official files")."""
    ids = [v7.bos_id, v7.special_id("[INST]"), *v7.encode("Hello, how are you?"), v7.special_id("[/INST]")]
    assert ids == [1, 3, 22177, 1044, 2606, 1584, 1636, 1063, 4]
    assert v7.encode("[INST]") == [1091, 3174, 3074, 1093]
    assert v7.decode(ids) == "Hello, how are you?"
    assert v7.decode(ids, "keep") == "<s>[INST]Hello, how are you?[/INST]"


def test_v11_special_tokens(v7, v11):
    assert (v11.version, v7.version) == ("v11", "v7")
    names = ["[ARGS]", "[CALL_ID]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    assert [v11.special_id(name) for name in names] == [32, 33, 10, 12, 13]
    assert v11.special_name(19) == "[TOOL_CONTENT]" and v11.special_name(999) == "<SPECIAL_999>"
    assert v7.special_name(32) == "<SPECIAL_32>"
    with pytest.raises(ValueError, match=r"\[ARGS\]"):
        v7.special_id("[ARGS]")
    assert v11.token_bytes(3) == b"" and v11.token_bytes(1000) == b"\x00" and not v11.is_special(1000)


def test_ids_of_any_integer_type(v11):
    ids = v11.encode("numpy ids", bos=True)
    assert v11.decode(np.array(ids)) == v11.decode([np.int64(i) for i in ids]) == "numpy ids"
    with pytest.raises(TypeError):
        v11.decode([1.5])
    with pytest.raises(TypeError, match="str"):
        v11.encode(b"bytes")


@pytest.mark.parametrize("bad", [[131072], [5, -1], [10**12]])
def test_out_of_range_ids(v11, bad):
    wrong = next(i for i in bad if not 0 <= i < 131072)
    message = rf"token id {wrong} .*n_words=131072"
    with pytest.raises(ValueError, match=message):
        v11.decode(bad)
    with pytest.raises(ValueError, match=message):
        v11.token_bytes(wrong)
    with pytest.raises(ValueError, match=message):
        v11.is_special(wrong)


def test_bad_lookups(v11):
    with pytest.raises(ValueError, match=r"'\[NOPE\]'"):
        v11.special_id("[NOPE]")
    with pytest.raises(ValueError, match="id 5000 is a regular token"):
        v11.special_name(5000)
    with pytest.raises(ValueError, match="special must be one of"):
        v11.decode([1], special="drop")
    with pytest.raises(ValueError, match=r"id 3 is the special token \[INST\]"):
        v11.decode([1000, 3], special="raise")


# ---- Small hand-written tekken.json files: versions, legacy keys, bad input ----

PATTERN = r" ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+"
MERGES = [b"ab", b"cd", b"abcd", b" a", b"ba"]


def tiny_tekken(version: str = "v11", n_special: int = 40, specials: bool = True) -> dict:
    """A valid tekken.json (as a dict) with the 256 byte tokens and a few merges."""
    tokens = [bytes([b]) for b in range(256)] + MERGES
    vocab = [{"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("latin-1")}
             for i, t in enumerate(tokens)]
    config = {"pattern": PATTERN, "num_vocab_tokens": len(tokens), "version": version,
              "default_vocab_size": n_special + len(tokens), "default_num_special_tokens": n_special}
    data = {"config": config, "vocab": vocab}
    if specials:
        data["special_tokens"] = special_list(version, n_special)
    return data


def write_json(folder, data, name: str = "tekken.json"):
    path = folder / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("version,specials",
                         [("v3", False), ("v7", False), ("v7", True), ("v11", True), ("v13", True)])
def test_tiny_files_match_mistral_common(tmp_path, version, specials):
    path = write_json(tmp_path, tiny_tekken(version, specials=specials))
    ours, theirs = Tokenizer.from_file(path), Tekkenizer.from_file(path)
    assert (ours.version, ours.n_words, ours.image) == (version, theirs.n_words, None)
    for s in ["abcd ab cd", "ba ab a b", "[INST] x", "é", ""]:
        assert ours.encode(s, bos=True) == theirs.encode(s, bos=True, eos=False)
    names = [ours.special_name(i) for i in range(40)]
    assert names == [theirs.id_to_piece(i) for i in range(40)]
    assert names[32] == ("[ARGS]" if version in ("v11", "v13") else "<SPECIAL_32>")


def test_only_the_declared_vocabulary_is_used(tmp_path):
    data = tiny_tekken()
    data["config"]["default_vocab_size"] -= 3  # drops the merges "abcd", " a", "ba"
    path = write_json(tmp_path, data)
    ours, theirs = Tokenizer.from_file(path), Tekkenizer.from_file(path)
    assert ours.n_words == 40 + 258
    # "ab" "cd" | " " "b" "a": ids 40 + rank, bytes first (b"a" is 97), then "ab" 296, "cd" 297
    expected = theirs.encode("abcd ba", bos=False, eos=False)
    assert ours.encode("abcd ba") == expected == [296, 297, 72, 138, 137]
    with pytest.raises(ValueError, match="n_words=298"):
        ours.decode([298])


@pytest.mark.parametrize("key", ["image", "multimodal"])
def test_image_section_and_legacy_key(tmp_path, key):
    data = tiny_tekken("v11")
    data[key] = {"image_patch_size": 16, "max_image_size": 1024}  # no spatial_merge_size: 1
    path = write_json(tmp_path, data)
    expected = Tekkenizer.from_file(path).image
    assert Tokenizer.from_file(path).image == ImageConfig(16, 1024, 1) == ImageConfig(
        expected.image_patch_size, expected.max_image_size, expected.spatial_merge_size)


def set_config(**values):
    return lambda data: data["config"].update(values)


def set_entry(key: str, index: int, **values):
    return lambda data: data[key][index].update(values)


def set_image(section: dict):
    return lambda data: data.update(image=section)


def v13_with_multimodal_key(data: dict) -> None:
    data["config"]["version"] = "v13"
    data["multimodal"] = {"image_patch_size": 14, "max_image_size": 1540}


BAD_TEKKEN = [  # (expected error, how a valid tiny v11 file is broken)
    ("unknown Tekken version 'v5'", set_config(version="v5")),
    ("unknown Tekken version 'v15'", set_config(version="v15")),
    ("unknown Tekken version None", lambda data: data["config"].pop("version")),
    (r"config\['default_vocab_size'\] must be of type int", set_config(default_vocab_size="many")),
    (r"config\['pattern'\] is not a valid regular expression", set_config(pattern="(")),
    ("a v11 tekken.json must list its special_tokens", lambda data: data.pop("special_tokens")),
    (r"repeated: \['\[INST\]'\]", set_entry("special_tokens", 5, token_str="[INST]")),
    (r"special_tokens\[7\] must be", set_entry("special_tokens", 7, rank=8)),
    ("41 special tokens, more than default_num_special_tokens=40",
     lambda data: data["special_tokens"].append({"rank": 40, "token_str": "[X]", "is_control": True})),
    (r"lacks \['<pad>'\]", set_entry("special_tokens", 11, token_str="[PAD]")),
    ("vocab has 258 entries, fewer than the 261 declared",
     lambda data: data.update(vocab=data["vocab"][:258])),
    (r"vocab\[260\] has rank 7", set_entry("vocab", 260, rank=7)),
    (r"vocab\[3\] is malformed", lambda data: data["vocab"][3].pop("token_bytes")),
    ("the same token bytes twice", set_entry("vocab", 260, token_bytes="YWI=")),  # b"ab" again
    ("must start with the 256 single bytes", set_entry("vocab", 65, token_bytes="eno=")),  # b"zz", not b"A"
    ("call its image section 'image'", v13_with_multimodal_key),
    ("image sizes must be positive", set_image({"image_patch_size": 0, "max_image_size": 1540})),
    ("needs image_patch_size and max_image_size", set_image({"patch_size": 14})),
]


@pytest.mark.parametrize("message,breaks", BAD_TEKKEN, ids=[message for message, _ in BAD_TEKKEN])
def test_bad_tekken_files(tmp_path, message, breaks):
    data = tiny_tekken()
    breaks(data)
    path = write_json(tmp_path, data)
    with pytest.raises(ValueError, match=message) as error:
        Tokenizer.from_file(path)
    assert str(path) in str(error.value)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        Tokenizer.from_file(tmp_path / "nowhere.json")
    (tmp_path / "broken.json").write_text('{"config": ', encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        Tokenizer.from_file(tmp_path / "broken.json")
    for not_tekken in [{"hello": "world"}, [1, 2, 3]]:
        with pytest.raises(ValueError, match="other.json: not a Tekken file"):
            Tokenizer.from_file(write_json(tmp_path, not_tekken, "other.json"))
    (tmp_path / "junk.model").write_bytes(b"\x00\x01 not a protobuf")
    with pytest.raises(ValueError, match="junk.model: not a SentencePiece model"):
        Tokenizer.from_file(tmp_path / "junk.model")
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match="notes.txt: not a tokenizer file"):
        Tokenizer.from_file(tmp_path / "notes.txt")
    shutil.copy(SHIPPED_SENTENCEPIECE[0], tmp_path / "tokenizer.model.v9")
    with pytest.raises(ValueError, match="unknown SentencePiece tokenizer version 'v9'"):
        Tokenizer.from_file(tmp_path / "tokenizer.model.v9")


def test_sentencepiece_versions_from_file_names(tmp_path):
    source = next(p for p in SHIPPED_SENTENCEPIECE if p.name.endswith(".v3"))
    for name, version in [("tokenizer.model", "v1"), ("tokenizer.model.v2", "v2"), ("x.model.v3m1", "v3")]:
        shutil.copy(source, tmp_path / name)
        assert Tokenizer.from_file(tmp_path / name).version == version
    ours = Tokenizer.from_file(source)
    assert ours.pad_id == -1 and ours.special_id("[IMG]") == 10 and not ours.is_special(ours.unk_id)
    with pytest.raises(ValueError, match="surrogates not allowed"):
        ours.encode("bad \udcff")
