"""Reasoning models (Magistral Small 2506, 2507, 2509): thoughts laid out in the prompt, and read back from
the generated ids, whole (parse_output) and as they come (OutputStream).

The prompt side is compared, conversation by conversation, with two things mistral-common says:
- v13 ([THINK] tokens): its encode_chat_completion (ThinkChunk, reasoning_content / reasoning);
- v11 and v13: its own chat template for the version (plain <think> tags for v11: mistral-common's encoder
  has no layout for a v11 ThinkChunk and refuses it), rendered by transformers and tokenized by
  mistral-common's tokenizer, control-token names becoming control tokens.
The output side is compared with mistral-common's splitter of think chunks (v13) and with the text split
the project used before the stream (v11).
"""
import json
import random
import re

import pytest
from mistral_common.experimental.think import _split_content_and_think_chunks
from mistral_common.integrations.chat_templates.chat_templates import generate_chat_template
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image
from transformers.utils.chat_template_utils import render_jinja_template

import generate
from chat import KINDS, OutputStream, drop_reasoning, encode_chat, load_system_prompt, parse_output
from checkpoints import TINY_VISION_PARAMS, write_native
from inputs import InputError
from tekken_files import SHIPPED_SENTENCEPIECE, write_tekken
from test_chat import WEATHER, assert_same_images, call, mistral_request, result, system, text, user
from tokenizer import Tokenizer

VERSIONS = ("v11", "v13")   # the reasoning layouts: plain tags (Magistral 2506), [THINK] tokens (2507, 2509)


def thinking(thought: str, closed: bool = True) -> dict:
    return {"type": "thinking", "thinking": thought, "closed": closed}


def said(content, reasoning=None, field="reasoning_content", calls=None, prefix=False) -> dict:
    """An assistant message, its reasoning in `field` as an OpenAI-compatible server returns it."""
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message[field] = reasoning
    if calls:
        message["tool_calls"] = calls
    if prefix:
        message["prefix"] = True
    return message


# The layout of Magistral Small 2507's and 2509's system prompt: the answer's shape, a thought in it.
SYSTEM_PARTS = [text("First draft your thinking process (inner monologue) until you arrive at a response. "
                     "Your thinking process must follow the template below:"),
                thinking("Your thoughts or/and draft, like working through an exercise on scratch paper."),
                text("Here, provide a self-contained response.")]
Q = "What is 2+2?"
ARGS = '{"city": "Paris"}'   # json.dumps' layout, which a template copies and encode_chat re-serializes to

# name -> (messages, tools)
CONVERSATIONS = {
    "system_thinking_chunk": ([system(SYSTEM_PARTS), user(Q)], None),
    "reasoning_content_sent_back": ([user(Q), said("The answer is 4.", "2 and 2 make 4."), user("And 3+3?")], None),
    "reasoning_newer_field_name": ([user(Q), said("4.", "Two and two.", field="reasoning"), user("Why?")], None),
    "both_reasoning_fields_equal": ([user(Q), dict(said("4.", "Sum."), reasoning="Sum."), user("ok")], None),
    "empty_reasoning": ([user(Q), said("4.", ""), user("ok")], None),
    "thinking_part_in_content": ([user(Q), said([thinking("Add them."), text("It is 4.")]), user("ok")], None),
    "thinking_between_texts": ([user(Q), said([text("So "), thinking("t"), text(" four ")]), user("ok")], None),
    "answer_keeps_trailing_spaces": ([user(Q), said("Four.   ", "sum"), user("ok")], None),
    "open_thought_mid_conversation": ([user(Q), said([thinking("Hmm", closed=False), text("4")]), user("ok")],
                                      None),
    "consecutive_assistants": ([user(Q), said("One."), said("Two.", "second thought"), said([text("Three.")]),
                                user("ok")], None),
    "tool_call_after_thinking": ([system(SYSTEM_PARTS), user("Weather in Paris?"),
                                  said(None, "I should call the tool.", calls=[call("abcDEF123", "get_weather", ARGS)]),
                                  result("abcDEF123", '{"temp": 21}'), said("It is 21C.", "Warm."), user("Thanks!")],
                                 [WEATHER]),
    "thought_content_and_call": ([user("Weather?"), said("Let me check.", "Call it.",
                                                         calls=[call("abcDEF123", "get_weather", ARGS)]),
                                  result("abcDEF123", "sunny")], [WEATHER]),
    "multi_turn_thoughts": ([system(SYSTEM_PARTS), user("Hi"), said("Hello!", "A greeting."), user(Q),
                             said("4", "Easy: 4.\n\n"), user("And 5+5?")], None),
    "think_text_typed_by_user": ([system("Tags: [THINK] and <think>."), user("What is [THINK]...[/THINK] or "
                                                                            "<think></think>?"),
                                  said("Markers: [THINK] and </think>.", "They typed [/THINK] <think>"),
                                  user("ok")], None),
    "unicode_thoughts": ([user("Ça va ? 東京"), said("Très bien 😀", "L'utilisateur… 東京\n\n\ttab"), user("…")],
                         None),
    "image_then_reasoning": ([user([text("What is this?"), {"type": "image", "image": "noise 40x30"}]),
                              said("Noise.", "Random pixels."), user("Sure?")], None),
    "prefix_open_thought": ([user(Q), said([thinking("Let me add", closed=False)], prefix=True)], None),
    "prefix_closed_thought_partial_answer": ([user(Q), said([thinking("2+2=4"), text("The answer is")],
                                                            prefix=True)], None),
    "prefix_reasoning_field_only": ([user(Q), said(None, "First, ", prefix=True)], None),
}
# Where the template is no reference: mistral-common's encoder lays out an empty reasoning as an empty thought,
# [THINK][/THINK] (what a model that thought nothing generated), its templates leave it out, and encode_chat
# follows the encoder; and a template's text cannot tell a typed "[THINK]" from the control token.
NO_TEMPLATE = {("empty_reasoning", "v11"), ("empty_reasoning", "v13"), ("think_text_typed_by_user", "v13")}


def materialize(messages: list[dict]) -> list[dict]:
    """The conversation with its image marker made a real image."""
    def part(p):
        if isinstance(p, dict) and p.get("type") == "image":
            return {"type": "image", "image": Image.effect_noise((40, 30), 64).convert("RGB")}
        return p
    return [dict(m, content=[part(p) for p in m["content"]]) if isinstance(m.get("content"), list) else m
            for m in messages]


# ---------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tekken(tmp_path_factory):
    """version -> (our Tokenizer, mistral-common's MistralTokenizer), both from one exact tekken.json."""
    pairs = {}
    for version in ("v7", "v11", "v13"):
        path = write_tekken(tmp_path_factory.mktemp(version), version)
        pairs[version] = Tokenizer.from_file(path), MistralTokenizer.from_file(str(path))
    return pairs


@pytest.fixture(scope="session")
def templates():
    """version -> mistral-common's chat template for a reasoning model of that version."""
    return {version: generate_chat_template(
        spm=False, tokenizer_version=TokenizerVersion(version), image_support=True, audio_support=False,
        thinking_support=version == "v13", plain_thinking_support=version == "v11", default_system_prompt=None,
        use_special_token_variables=True, model_settings_fields=None, reasoning_effort_values=None,
        reasoning_effort_default=None) for version in VERSIONS}


def template_ids(template: str, mistral: MistralTokenizer, messages: list[dict], tools) -> list[int]:
    """The template rendered by transformers, then tokenized by mistral-common: the text between control-token
    names encoded, each name its id. A final prefix message is rendered whole and its </s> cut off."""
    prefix = bool(messages[-1].get("prefix"))
    shown = [{key: value for key, value in m.items() if key != "prefix"} for m in messages]
    (rendered,), _ = render_jinja_template([shown], tools=tools, chat_template=template, bos_token="<s>",
                                           eos_token="</s>")
    if prefix:
        assert rendered.endswith("</s>")
        rendered = rendered[:-len("</s>")]
    tekkenizer = mistral.instruct_tokenizer.tokenizer
    names = [tekkenizer.id_to_piece(i) for i in range(tekkenizer.num_special_tokens)]
    pattern = "(" + "|".join(re.escape(name) for name in names if not name.startswith("<SPECIAL_")) + ")"
    ids = []
    for k, piece in enumerate(re.split(pattern, rendered)):
        ids += [tekkenizer.get_special_token(piece)] if k % 2 else tekkenizer.encode(piece, bos=False, eos=False)
    return ids


def collapse_images(tokenizer, ids: list[int]) -> list[int]:
    """Each image's run of [IMG], [IMG_BREAK] and [IMG_END] as one [IMG], as a template writes it."""
    image = {tokenizer.special_id(name) for name in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")}
    out = []
    for i in ids:
        if i in image:
            if out and out[-1] == tokenizer.special_id("[IMG]"):
                continue
            i = tokenizer.special_id("[IMG]")
        out.append(i)
    return out


# ---------------------------------------------------------------------------------------- prompts

def test_table_size():
    """Each conversation is compared for v13 with the encoder, and for v11 and v13 with the template, but
    where NO_TEMPLATE says why not; v11's empty_reasoning has no reference (the v11 encoder has no thoughts)."""
    assert len(CONVERSATIONS) >= 18
    assert {name for name, version in NO_TEMPLATE} <= set(CONVERSATIONS)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_v13_matches_mistral_common(name, tekken):
    ours, theirs = tekken["v13"]
    messages, tools = CONVERSATIONS[name]
    messages = materialize(messages)
    ids, images = encode_chat(ours, messages, tools)
    expected = theirs.encode_chat_completion(mistral_request(messages, tools))
    assert ids == expected.tokens, (f"{name}:\n ours   {ours.decode(ids, special='keep')!r}\n"
                                    f" theirs {ours.decode(expected.tokens, special='keep')!r}")
    assert_same_images(images, expected.images)


@pytest.mark.parametrize("name,version", [(name, version) for name in CONVERSATIONS for version in VERSIONS
                                          if (name, version) not in NO_TEMPLATE])
def test_matches_mistral_common_template(name, version, tekken, templates):
    ours, theirs = tekken[version]
    messages, tools = CONVERSATIONS[name]
    messages = materialize(messages)
    ids = collapse_images(ours, encode_chat(ours, messages, tools)[0])
    expected = template_ids(templates[version], theirs, messages, tools)
    assert ids == expected, (f"{name} {version}:\n ours   {ours.decode(ids, special='keep')!r}\n"
                             f" theirs {ours.decode(expected, special='keep')!r}")


def test_v11_encoder_has_no_think_layout(tekken):
    """Why the template is v11's reference: mistral-common's encoder refuses a v11 thought."""
    messages, tools = CONVERSATIONS["thinking_part_in_content"]
    with pytest.raises(Exception, match="Think not implemented"):
        tekken["v11"][1].encode_chat_completion(mistral_request(messages, tools))


def without_thoughts(messages: list[dict]) -> list[dict]:
    """Every thought left out: reasoning fields, thinking parts (system ones too), assistant messages emptied."""
    out = []
    for m in messages:
        m = {key: value for key, value in m.items() if key not in ("reasoning_content", "reasoning")}
        if isinstance(m.get("content"), list):
            m["content"] = [p for p in m["content"] if p.get("type") != "thinking"]
        if m["role"] != "assistant" or m.get("content") or m.get("tool_calls"):
            out.append(m)
    return out


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_thoughts_are_in_the_prompt(name, tekken, templates):
    """Negative controls: a layout that lost the thoughts, or wrote both versions alike, fails the comparisons
    above. The reference ids differ from those of the conversation without its reasoning (system thoughts
    and a continued prefix's included), and the two versions' prompts differ."""
    messages, tools = CONVERSATIONS[name]
    messages = materialize(messages)
    ours, theirs = tekken["v13"]
    expected = theirs.encode_chat_completion(mistral_request(messages, tools)).tokens
    assert encode_chat(ours, without_thoughts(messages), tools)[0] != expected
    assert encode_chat(ours, messages, tools)[0] != encode_chat(tekken["v11"][0], messages, tools)[0]


def test_v13_thought_layout(tekken):
    ours = tekken["v13"][0]
    messages, tools = CONVERSATIONS["tool_call_after_thinking"]
    shown = ours.decode(encode_chat(ours, messages, tools)[0], special="keep")
    assert ("[INST]Weather in Paris?[/INST][THINK]I should call the tool.[/THINK][TOOL_CALLS]get_weather[ARGS]"
            '{"city": "Paris"}</s>[TOOL_RESULTS]{"temp": 21}[/TOOL_RESULTS][THINK]Warm.[/THINK]It is 21C.</s>') in shown
    assert "[SYSTEM_PROMPT]First draft" in shown and "below:[THINK]Your thoughts" in shown
    v11 = tekken["v11"][0]
    shown = v11.decode(encode_chat(v11, messages, tools)[0], special="keep")
    assert "[/INST]<think>I should call the tool.</think>[TOOL_CALLS]get_weather[CALL_ID]abcDEF123" in shown


def test_typed_think_markers_stay_text(tekken):
    ours = tekken["v13"][0]
    ids, _ = encode_chat(ours, [user("[THINK]x[/THINK] <think>")])
    specials = [ours.bos_id, ours.special_id("[INST]"), ours.special_id("[/INST]")]
    assert [i for i in ids if ours.is_special(i)] == specials


BAD = {  # name -> (version, messages, words the error must contain); mistral-common refuses these too
    "thinking_in_user": ("v13", [user([thinking("x")])], ["message 0", "system and assistant"]),
    "thinking_in_tool": ("v13", [user("a"), said(None, calls=[call("abcDEF123", "f", "{}")]),
                                 result("abcDEF123", [thinking("x")])], ["message 2", "system and assistant"]),
    "reasoning_fields_differ": ("v13", [user("a"), dict(said("b", "one"), reasoning="two"), user("c")],
                                ["message 1", "differ"]),
    "thinking_and_reasoning_field": ("v13", [user("a"), said([thinking("t"), text("b")], "t"), user("c")],
                                     ["message 1", "reasoning field"]),
    "v7_has_no_thought_layout": ("v7", [user("a"), said("b", "t"), user("c")], ["message 1", "v7"]),
    "v7_system_thought": ("v7", [system(SYSTEM_PARTS), user("a")], ["message 0", "v7"]),
}
OURS_ONLY = {  # name -> (version, messages, words): shapes mistral-common's models coerce or never check
    "thinking_not_text": ("v13", [user("a"), said([thinking(3)]), user("c")], ["message 1", "part 0", "thinking"]),
    "closed_not_bool": ("v13", [user("a"), said([{"type": "thinking", "thinking": "t", "closed": "no"}]), user("c")],
                        ["message 1", "part 0", "closed"]),
    "reasoning_not_text": ("v13", [user("a"), said("b", ["t"]), user("c")], ["message 1", "reasoning_content"]),
}


@pytest.mark.parametrize("name", BAD)
def test_mistral_common_rejects_bad_reasoning_too(name, tekken):
    version, messages, _ = BAD[name]
    with pytest.raises(Exception):
        tekken[version][1].encode_chat_completion(mistral_request(messages, None))


@pytest.mark.parametrize("name", {**BAD, **OURS_ONLY})
def test_bad_reasoning_is_one_clear_error(name, tekken):
    version, messages, words = {**BAD, **OURS_ONLY}[name]
    with pytest.raises(InputError) as error:
        encode_chat(tekken[version][0], messages)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_v13_tokenizer_without_think_tokens(tmp_path):
    plain = Tokenizer.from_file(write_tekken(tmp_path, "v13", think=False))
    with pytest.raises(InputError, match=r"message 1 .*no \[THINK\] token"):
        encode_chat(plain, [user("a"), said("b", "t"), user("c")])
    assert encode_chat(plain, [user("a"), said("b"), user("c")])[0]   # no thought: the layout as ever


# ---------------------------------------------------------------------------------------- keep or drop

def test_drop_reasoning():
    messages = [system(SYSTEM_PARTS), user(Q), said("4.", "Sum."), said([thinking("only a thought")]),
                said([thinking("t"), text("Four.")], calls=[call("abcDEF123", "f", "{}")]),
                result("abcDEF123", "r"), said(None, "Thinking...", prefix=True)]
    before = json.dumps(messages)
    dropped = drop_reasoning(messages)
    assert json.dumps(messages) == before   # the caller's messages are untouched
    assert dropped == [system(SYSTEM_PARTS), user(Q), said("4."),
                       said([text("Four.")], calls=[call("abcDEF123", "f", "{}")]), result("abcDEF123", "r"),
                       said(None, "Thinking...", prefix=True)]
    assert drop_reasoning(["not a message", {"role": "robot"}]) == ["not a message", {"role": "robot"}]


@pytest.mark.parametrize("version", VERSIONS)
def test_dropped_reasoning_is_the_plain_layout(version, tekken):
    ours = tekken[version][0]
    messages, tools = CONVERSATIONS["multi_turn_thoughts"]
    plain = [system(SYSTEM_PARTS), user("Hi"), said("Hello!"), user(Q), said("4"), user("And 5+5?")]
    assert encode_chat(ours, drop_reasoning(messages), tools) == encode_chat(ours, plain, tools)
    assert encode_chat(ours, messages, tools) != encode_chat(ours, plain, tools)


def test_system_prompt_with_a_thought(tmp_path, tekken):
    """Magistral 2507 / 2509's SYSTEM_PROMPT.txt: the [THINK] ... [/THINK] it shows becomes a thinking part."""
    (tmp_path / "SYSTEM_PROMPT.txt").write_text("You are {name}. Think:[THINK]Your thoughts.[/THINK]Answer.",
                                                encoding="utf-8")
    content = load_system_prompt(tmp_path, "mistralai/Magistral-Small-2509")
    assert content == [text("You are Magistral-Small-2509. Think:"), thinking("Your thoughts."), text("Answer.")]
    ours, theirs = tekken["v13"]
    messages = [system(content), user(Q)]
    assert encode_chat(ours, messages)[0] == theirs.encode_chat_completion(mistral_request(messages, None)).tokens
    (tmp_path / "SYSTEM_PROMPT.txt").write_text("Half a tag: [THINK] only.", encoding="utf-8")
    assert load_system_prompt(tmp_path, "m") == "Half a tag: [THINK] only."


# ---------------------------------------------------------------------------------------- output

def ids_of(tokenizer, *pieces, encode=None) -> list[int]:
    """Generated ids: a name in brackets ("[THINK]", "</s>") is that control token, bytes are byte tokens
    (the ids 1000 + byte of these files), other text is encoded."""
    ids = []
    for piece in pieces:
        if isinstance(piece, bytes):
            ids += [1000 + b for b in piece]
        elif piece == "</s>" or re.fullmatch(r"\[/?[A-Z_]+\]", piece):
            ids.append(tokenizer.special_id(piece))
        else:
            ids += (encode or tokenizer.encode)(piece)
    return ids


def byte_ids(tokenizer, *pieces) -> list[int]:
    """The same, every text one token per byte: tags and UTF-8 characters split across many tokens."""
    return ids_of(tokenizer, *pieces, encode=lambda piece: [1000 + b for b in piece.encode()])


# name -> (version, pieces, (reasoning, content), tool call names)
OUTPUTS = {
    "think_tokens": ("v13", ["[THINK]", "2 and 2 make 4.", "[/THINK]", "The answer is 4.", "</s>"],
                     ("2 and 2 make 4.", "The answer is 4."), []),
    "think_tokens_kept_as_written": ("v13", ["[THINK]", "\n a \n", "[/THINK]", "\n\nb "], ("\n a \n", "\n\nb "), []),
    "think_tokens_cut_off": ("v13", ["[THINK]", "Let me see… 東京"], ("Let me see… 東京", ""), []),
    "think_tokens_then_tool_call": ("v13", ["[THINK]", "Need the weather.", "[/THINK]", "[TOOL_CALLS]",
                                            "get_weather", "[ARGS]", ARGS, "</s>"], ("Need the weather.", ""),
                                    ["get_weather"]),
    "think_tokens_answer_then_call": ("v13", ["[THINK]", "x", "[/THINK]", "Checking.", "[TOOL_CALLS]", "f",
                                              "[ARGS]", "{}"], ("x", "Checking."), ["f"]),
    "typed_think_marker_is_content": ("v13", ["Write [THINK] and [/THINK] as text."],
                                      (None, "Write [THINK] and [/THINK] as text."), []),
    "tags_are_content_for_v13": ("v13", ["<think>a</think>b"], (None, "<think>a</think>b"), []),
    "content_around_a_thought": ("v13", ["Hi ", "[THINK]", "x", "[/THINK]", "there"], ("x", "Hi there"), []),
    "end_without_begin": ("v13", ["a", "[/THINK]", "b"], (None, "ab"), []),
    "empty_thought": ("v13", ["[THINK]", "[/THINK]", "a"], ("", "a"), []),
    "after_eos_ignored": ("v13", ["[THINK]", "x", "[/THINK]", "a", "</s>", "[THINK]", "late"], ("x", "a"), []),
    "tags": ("v11", ["<think>\nLet me add: 2 + 2 = 4.\n</think>\n\nThe answer is **4**.", "</s>"],
             ("Let me add: 2 + 2 = 4.", "The answer is **4**."), []),
    "tags_cut_off": ("v11", ["<think>\nStill thinking  "], ("Still thinking", ""), []),
    "tags_cut_off_in_end_tag": ("v11", ["<think>\nAlmost </thi"], ("Almost </thi", ""), []),
    "tags_then_tool_call": ("v11", ["<think>Call it.</think>", "[TOOL_CALLS]", "f", "[CALL_ID]", "abcDEF123",
                                    "[ARGS]", "{}"], ("Call it.", ""), ["f"]),
    "tag_mid_answer_is_content": ("v11", ["No <think> here, nor </think>."],
                                  (None, "No <think> here, nor </think>."), []),
    "second_tag_is_content": ("v11", ["<think>a</think>b <think>c</think>"], ("a", "b <think>c</think>"), []),
    "blanks_before_the_tag": ("v11", [" \n<think> a </think> b"], ("a", "b"), []),
    "only_the_tag": ("v11", ["<think>"], ("", ""), []),
    "half_a_tag": ("v11", ["  <thi"], (None, "  <thi"), []),
    "blanks_only": ("v11", [" \n "], (None, " \n "), []),
    "tag_broken_by_a_special_token": ("v11", ["<th", "[INST]", "ink>a"], ("a", ""), []),
    "lookalike_end_tag": ("v11", ["<think>a </thinking> b</think>c"], ("a </thinking> b", "c"), []),
}


def streamed(tokenizer, ids, tags=True) -> tuple[str | None, str]:
    stream = OutputStream(tokenizer, tags)
    pieces = [piece for token in ids for piece in stream.feed(token)] + stream.close()
    assert all(kind in KINDS and text for kind, text in pieces)
    reasoning, content = ("".join(t for k, t in pieces if k == kind) for kind in KINDS)
    return (reasoning if stream.reasoned else None), content


@pytest.mark.parametrize("split", [ids_of, byte_ids])
@pytest.mark.parametrize("name", OUTPUTS)
def test_parse_output(name, split, tekken):
    version, pieces, fields, calls = OUTPUTS[name]
    ours = tekken[version][0]
    ids = split(ours, *pieces)
    parsed = parse_output(ours, ids)
    assert (parsed.reasoning, parsed.content) == fields
    assert [call.name for call in parsed.tool_calls] == calls and not any(call.error for call in parsed.tool_calls)
    assert streamed(ours, ids) == fields   # fed one id at a time, the same


def test_detokenized_text_loses_the_thought(tekken):
    """Negative control: a parser that sees text decoded without control tokens (as many servers' do) finds
    no thought in a v13 answer: the split has to be made on the ids."""
    ours = tekken["v13"][0]
    ids = ids_of(ours, *OUTPUTS["think_tokens"][1])
    assert ours.decode(ids) == "2 and 2 make 4.The answer is 4."
    assert streamed(ours, ours.encode(ours.decode(ids))) == (None, "2 and 2 make 4.The answer is 4.")


def test_tags_off_for_a_model_that_does_not_think(tekken):
    ours = tekken["v11"][0]
    ids = ids_of(ours, "<think>a</think>b")
    assert (parse_output(ours, ids, tags=False).reasoning, parse_output(ours, ids, tags=False).content) == (
        None, "<think>a</think>b")
    assert streamed(ours, ids, tags=False) == (None, "<think>a</think>b")


def test_thought_round_trip(tekken):
    """A v13 answer read back and sent again with its reasoning is the prompt plus exactly the ids generated."""
    ours = tekken["v13"][0]
    messages = [system(SYSTEM_PARTS), user(Q)]
    generated = ids_of(ours, "[THINK]", "2 and 2 make 4.\n", "[/THINK]", "The answer is 4.", "</s>")
    message = parse_output(ours, generated).to_message(reasoning=True)
    assert message == said("The answer is 4.", "2 and 2 make 4.\n")
    again, _ = encode_chat(ours, messages + [dict(message, prefix=True)])
    assert again + [ours.eos_id] == encode_chat(ours, messages)[0] + generated
    assert "reasoning_content" not in parse_output(ours, generated).to_message()


def tag_reference(text: str) -> tuple[str | None, str]:
    """The text split the project made before the stream, on the whole decoded text."""
    if not text.lstrip().startswith("<think>"):
        return None, text
    thought, closed, answer = text.lstrip()[len("<think>"):].partition("</think>")
    return thought.strip(), (answer.lstrip() if closed else "")


TEXTS = ["<think>", "</think>", "<th", "ink>", "</", "think>", " ", "\n", "\n\n", "a", "two words", "é", "東京", "😀",
         "say [THINK]", "\t", b"\xc3", b"\xa9", b"\xe6\x9d"]   # bytes: characters split, or broken by a special


def random_output(rng: random.Random, tokenizer, think: bool) -> list[int]:
    """Random generated ids: texts (encoded whole or byte by byte), think tokens well nested, stray specials."""
    pieces, open_ = [], False
    for _ in range(rng.randint(0, 14)):
        r = rng.random()
        if think and r < 0.15:
            pieces.append("[/THINK]" if open_ else "[THINK]")
            open_ = not open_
        elif r < 0.2:
            pieces.append(rng.choice(["[INST]", "[IMG]"]))
        else:
            pieces.append(rng.choice(TEXTS))
    if not think and rng.random() < 0.5:   # the text form: most answers open with a thought
        pieces.insert(rng.randint(0, len(pieces)), "</think>")
        pieces.insert(0, rng.choice(["<think>", "\n<think>\n", "<think>a"]))
    split = rng.choice([ids_of, byte_ids])
    return split(tokenizer, *pieces) + [tokenizer.special_id("[TOOL_CALLS]")] * (rng.random() < 0.2)


def test_random_outputs_v13_match_mistral_common(tekken):
    """v13: the stream against mistral-common's splitter of think chunks, decoded by mistral-common."""
    ours, theirs = tekken["v13"]
    tekkenizer = theirs.instruct_tokenizer.tokenizer
    begin, end = ours.special_id("[THINK]"), ours.special_id("[/THINK]")
    rng, both = random.Random(13), 0
    for _ in range(1500):
        ids = random_output(rng, ours, think=True)
        text_ids = ids[:ids.index(ours.special_id("[TOOL_CALLS]"))] if ours.special_id("[TOOL_CALLS]") in ids else ids
        chunks = _split_content_and_think_chunks(text_ids, begin, end)
        reasoning = "".join(tekkenizer.decode(c) for c, think in chunks if think)
        content = "".join(tekkenizer.decode(c) for c, think in chunks if not think)
        expected = (reasoning if any(think for _, think in chunks) else None), content
        parsed = parse_output(ours, ids)
        assert (parsed.reasoning, parsed.content) == expected == streamed(ours, ids), ours.decode(ids, special="keep")
        both += bool(parsed.reasoning and parsed.content)
    assert both > 200   # not a vacuous comparison: many have a thought and an answer


def test_random_outputs_v11_match_the_text_split(tekken):
    ours = tekken["v11"][0]
    rng, both = random.Random(11), 0
    for _ in range(1500):
        ids = random_output(rng, ours, think=False)
        marker = ours.special_id("[TOOL_CALLS]")
        expected = tag_reference(ours.decode(ids[:ids.index(marker)] if marker in ids else ids))
        parsed = parse_output(ours, ids)
        assert (parsed.reasoning, parsed.content) == expected == streamed(ours, ids), ours.decode(ids, special="keep")
        both += bool(parsed.reasoning and parsed.content)
    assert both > 50


@pytest.mark.parametrize("path", [p for p in SHIPPED_SENTENCEPIECE if p.name.endswith((".v3", ".v7"))],
                         ids=lambda p: p.name)
def test_sentencepiece_text_as_decode(path):
    """A SentencePiece tokenizer's decode drops the space its encoder put first; the stream does too."""
    ours = Tokenizer.from_file(path)
    rng = random.Random(path.name)
    pool = ours.encode(" Hello  world\n é 東京 😀 <think> ") + list(range(3, 300))   # byte pieces among them
    pool = [i for i in pool if not ours.is_special(i)]
    for _ in range(500):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 10))]
        assert (parse_output(ours, ids, tags=False).content, streamed(ours, ids, tags=False)) == (
            ours.decode(ids), (None, ours.decode(ids)))


# ----------------------------------------------------------------------------- the command line

def test_the_cli_drops_earlier_thoughts_unless_keep_reasoning(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "Magistral-Small-2509"
    write_native(folder, {**TINY_VISION_PARAMS, "vocab_size": 131072, "max_position_embeddings": 300})
    tokenizer = Tokenizer.from_file(write_tekken(folder, "v13"))
    conversation = [{"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!", "reasoning_content": "A greeting."},
                    {"role": "user", "content": "Thanks"}]
    (tmp_path / "chat.json").write_text(json.dumps(conversation))
    prompts, real = [], generate.stream
    monkeypatch.setattr(generate, "stream", lambda model, ids, *a, **k: prompts.append(ids) or real(model, ids, *a, **k))
    flags = ["--model", str(folder), "--messages", str(tmp_path / "chat.json"), "--max-tokens", "1", "--dtype", "float32"]
    assert generate.main(flags) == 0 and generate.main(flags + ["--keep-reasoning"]) == 0
    dropped, kept = prompts
    assert kept == encode_chat(tokenizer, conversation)[0]
    assert dropped == encode_chat(tokenizer, drop_reasoning(conversation))[0] and dropped != kept
