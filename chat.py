"""Chat layout: OpenAI-style conversations -> token ids and images, and generated ids -> text and tool calls.

encode_chat() gives, token for token, what mistral-common's encode_chat_completion gives for the same
conversation; parse_output() reads one generated assistant turn back, and OutputStream reads it as it is
generated; load_system_prompt() fills the model repository's SYSTEM_PROMPT.txt. The layout depends on the
tokenizer version: v7 (Mistral Small 3.1), v11 (Mistral Small 3.2, Magistral Small 2506), v13 (later
releases: Magistral Small 2507 and 2509).

    <s>[SYSTEM_PROMPT]You are ...[/SYSTEM_PROMPT]                   system messages stay in place
    [INST]What is the weather in Paris?[/INST]                        consecutive user messages are joined
    [TOOL_CALLS]get_weather[CALL_ID]abcDEF123[ARGS]{"city": "Paris"}</s>         v13: without [CALL_ID]id
    [TOOL_RESULTS]abcDEF123[TOOL_CONTENT]{"temp": 21}[/TOOL_RESULTS]   v13: [TOOL_RESULTS]content[/..]
    It is 21C.</s>
    [AVAILABLE_TOOLS][{"type": "function", ...}][/AVAILABLE_TOOLS]    before the last user message
    [INST][IMG][IMG][IMG_BREAK][IMG][IMG][IMG_END]And this?[/INST]    (v13: the first); an image 2x2

v7 writes the calls of one turn as a single JSON list instead:
    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]</s>

One <s>, no </s> after user, system or tool messages; the prompt ends after [/INST] or
[/TOOL_RESULTS], or inside a final assistant message marked {"prefix": True}, which the model continues.

Reasoning. System and assistant messages may hold thinking parts, {"type": "thinking", "thinking": "...",
"closed": True} (mistral-common's ThinkChunk); an assistant message's `reasoning_content` (or `reasoning`,
the newer name), as OpenAI-compatible servers return it, is a thinking part before its content. v13 writes
a thought between control tokens, v11 (Magistral Small 2506) in the text, as mistral-common's chat
template for that model does:
    v13  [INST]What is 2+2?[/INST][THINK]2 and 2 make 4.[/THINK]4.</s>
    v11  [INST]What is 2+2?[/INST]<think>2 and 2 make 4.</think>4.</s>
A model's answer is read back the same way: reasoning is what lies between [THINK] and [/THINK], or, for
the text form, between a <think> that opens the answer and </think>.
"""
import codecs
import json
import random
import re
import string
from dataclasses import dataclass, field
from datetime import date, timedelta
from itertools import groupby
from pathlib import Path
from typing import Any, NoReturn

import torch

from images import load_image, preprocess_image, token_grid
from inputs import MAX_DEPTH, InputError, check_depth, json_depth, read_text

VERSIONS = ("v7", "v11", "v13")
JOIN = "\n\n"  # joins the texts of consecutive user (or assistant) messages and text parts
THINK_TAGS = ("<think>", "</think>")  # Magistral Small 2506 thinks in text (v11 has no [THINK] token)
REASONING_FIELDS = ("reasoning_content", "reasoning")  # an assistant message's reasoning, two names
KINDS = ("reasoning", "content")  # what OutputStream's pieces are
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # function names
NAME_RULE = "must be 1-64 letters, digits, '_' or '-'"
CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")  # tool-call ids up to v11
SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
# the roles that may directly follow each role (mistral-common's order rule)
MAY_FOLLOW = {
    "system": {"system", "user", "assistant"},
    "user": {"system", "user", "assistant"},
    "assistant": {"assistant", "user", "tool"},
    "tool": {"assistant", "tool", "user"},
}


@dataclass
class Thinking:
    """A thinking part: reasoning, as mistral-common's ThinkChunk. An open one (closed=False) has no end
    marker: the model goes on thinking."""
    text: str
    closed: bool = True


@dataclass
class Turn:
    """One checked message. `parts` holds text (str), image tensors [3, H, W] and Thinking, in order."""
    role: str  # system | user | assistant | tool
    index: int  # position of the (first) message in the caller's list, for error messages
    parts: list = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)  # assistant: {"id", "name", "arguments"}
    call_id: str | None = None  # tool: the call it answers
    prefix: bool = False  # assistant: the model continues it


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                system: str | list[dict] | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """Token ids of the prompt, and its images as pixel tensors [3, H, W] in prompt order. system: the
    system prompt of a conversation that has no system message (errors still count the caller's messages)."""
    version = tokenizer.version
    if version not in VERSIONS:
        raise InputError(f"no chat layout for tokenizer version {version!r}; expected one of {VERSIONS}")
    tool_list = read_tools(tools) if tools is not None else []
    tools_json = json.dumps(tool_list, ensure_ascii=False) if tool_list else None
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    turns = [read_message(tokenizer, message, i) for i, message in enumerate(messages)]
    check_order(turns)
    if system and not any(turn.role == "system" for turn in turns):
        turns.insert(0, read_message(tokenizer, {"role": "system", "content": system}, -1))
    turns = join_turns(turns, version)

    users = [k for k, turn in enumerate(turns) if turn.role == "user"]
    # tools go before the last user message (v13: the first), so the model sees them fresh
    tools_at = (users[0] if version == "v13" else users[-1]) if users and tools_json else None
    special = tokenizer.special_id
    ids, images = [tokenizer.bos_id], []
    for k, turn in enumerate(turns):
        if k == tools_at:
            ids += [special("[AVAILABLE_TOOLS]"), *tokenizer.encode(tools_json), special("[/AVAILABLE_TOOLS]")]
        if turn.role == "system":
            ids += [special("[SYSTEM_PROMPT]"), *content_ids(tokenizer, turn.parts), special("[/SYSTEM_PROMPT]")]
        elif turn.role == "user":
            ids += [special("[INST]"), *user_ids(tokenizer, turn.parts, images), special("[/INST]")]
        elif turn.role == "assistant":
            ids += assistant_ids(tokenizer, turn)
        else:
            ids += tool_result_ids(tokenizer, turn)
    return ids, images


# ---------------------------------------------------------------------------------------- reading input

def fail(index: int, role: str, problem: str) -> NoReturn:
    raise InputError(f"message {index} ({role}): {problem}")


def read_message(tokenizer, message: dict, i: int) -> Turn:
    if not isinstance(message, dict):
        raise InputError(f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str):   # (a dict or a list is not even hashable)
        raise InputError(f"message {i}: role must be a string (system, user, assistant or tool), "
                         f"got {type(role).__name__} {role!r:.60}")
    role = "system" if role == "developer" else role  # OpenAI's newer name for system
    if role not in MAY_FOLLOW:
        raise InputError(f"message {i}: unknown role {role!r}; expected system, user, assistant or tool")
    content = message.get("content")
    if content is None and role != "assistant":
        fail(i, role, "has no content")
    turn = Turn(role, i, read_content(tokenizer, content, i, role))
    if role == "assistant":
        reasoning = read_reasoning(message, i)
        if reasoning is not None:
            if any(isinstance(part, Thinking) for part in turn.parts):
                fail(i, role, "has thinking parts in its content and a reasoning field; send one of them")
            turn.parts.insert(0, thinking_part(tokenizer, reasoning, i, role))
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            fail(i, role, f"tool_calls must be a list, got {type(calls).__name__}")
        turn.calls = [read_call(call, i, tokenizer.version) for call in calls]
        turn.prefix = message.get("prefix", False)
        if not isinstance(turn.prefix, bool):
            fail(i, role, f"prefix must be True or False, got {turn.prefix!r}")
    if role == "tool":
        turn.call_id = message.get("tool_call_id")
        check_call_id(turn.call_id, i, role, tokenizer.version)
        if message.get("name") is not None and not NAME.fullmatch(str(message["name"])):
            fail(i, role, f"tool name {message['name']!r} {NAME_RULE}")
    return turn


def read_content(tokenizer, content, i: int, role: str) -> list:
    """A string, or a list of OpenAI parts, as a list of str and image tensors."""
    if content is None or isinstance(content, str):
        return [content] if content else []
    if not isinstance(content, list):
        fail(i, role, f"content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for k, part in enumerate(content):
        kind, slot = part.get("type") if isinstance(part, dict) else None, image_slot(part)
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif slot is not None and role == "user":
            holder, key = slot
            parts.append(read_image(tokenizer, holder.get(key), i, k))
        elif slot is not None:
            fail(i, role, f"part {k}: images are only allowed in user messages")
        elif kind == "thinking":
            closed = part.get("closed", True)
            if not isinstance(part.get("thinking"), str) or not isinstance(closed, bool):
                fail(i, role, f"part {k}: a thinking part is {{'type': 'thinking', 'thinking': str, "
                              f"'closed': bool (default True)}}, got {part!r:.80}")
            parts.append(thinking_part(tokenizer, part["thinking"], i, role, closed))
        else:
            fail(i, role, f"part {k}: expected a 'text', 'image_url', 'image' or 'thinking' part, got {part!r:.80}")
    return parts


def image_slot(part) -> tuple[dict, str] | None:
    """Where an image part keeps its source, as (holder, key): OpenAI's {"type": "image_url", "image_url":
    {"url": URL}} in (part["image_url"], "url"); {"type": "image", "image": SOURCE} (mistral-common's)
    and {"type": "image_url", "image_url": URL} in the part itself. None for a part that is not an image."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in ("image_url", "image"):
        return None
    return (part["image_url"], "url") if isinstance(part.get("image_url"), dict) else (part, kind)


def image_slots(messages) -> list[tuple[dict, str]]:
    """image_slot of every image part of a conversation, which is not checked: what is not a list of
    messages with lists of parts is skipped (encode_chat says what is wrong with it)."""
    return [slot for message in (messages if isinstance(messages, list) else []) if isinstance(message, dict)
            for part in (message.get("content") if isinstance(message.get("content"), list) else [])
            if (slot := image_slot(part)) is not None]


def read_reasoning(message: dict, i: int) -> str | None:
    """An assistant message's reasoning field: `reasoning_content` or `reasoning` (equal if both)."""
    given = {key: message[key] for key in REASONING_FIELDS if message.get(key) is not None}
    for key, value in given.items():
        if not isinstance(value, str):
            fail(i, "assistant", f"{key} must be a string, got {type(value).__name__}")
    if len(set(given.values())) > 1:
        fail(i, "assistant", "reasoning_content and reasoning differ; send one of them")
    return next(iter(given.values()), None)


def thinking_part(tokenizer, text: str, i: int, role: str, closed: bool = True) -> Thinking:
    if role not in ("system", "assistant"):
        fail(i, role, "thinking is only allowed in system and assistant messages")
    if tokenizer.version == "v7":
        fail(i, role, "tokenizer v7 has no layout for thinking (reasoning models use v11 or v13)")
    if tokenizer.version == "v13" and optional_special(tokenizer, "[THINK]") is None:
        fail(i, role, "this v13 tokenizer has no [THINK] token: it is not a reasoning model's")
    return Thinking(text, closed)


def read_image(tokenizer, source, i: int, k: int) -> torch.Tensor:
    config = tokenizer.image
    if config is None:
        fail(i, "user", "this tokenizer has no image support (text-only model)")
    if source is None:
        fail(i, "user", f"part {k}: image part without an image or url")
    try:
        image = load_image(source)
    except InputError as e:  # a missing file, an unreachable URL, undecodable bytes, ...
        shown = f"{source:.60}" if isinstance(source, str) else type(source).__name__
        fail(i, "user", f"part {k}: cannot read image {shown!r}: {e}")
    return preprocess_image(image, config.patch_size, config.spatial_merge_size, config.max_image_size)


def read_call(call, i: int, version: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or call.get("type", "function") != "function":
        fail(i, "assistant", f"a tool call is {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}, "
                             f"got {call!r:.80}")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        fail(i, "assistant", f"function name {name!r} {NAME_RULE}")
    check_call_id(call.get("id"), i, "assistant", version)
    return {"id": call["id"], "name": name, "arguments": read_arguments(function.get("arguments"), i)}


def read_arguments(arguments, i: int):
    """Arguments as a JSON value. Text that is not JSON stays a string (then dumped as a JSON string)."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, dict):
        check_json(arguments, f"message {i} (assistant): arguments")
        return arguments
    if not isinstance(arguments, str):
        fail(i, "assistant", f"arguments must be a JSON string or a dict, got {type(arguments).__name__}")
    if json_depth(arguments.encode("utf-8", "surrogatepass")) > MAX_DEPTH:
        fail(i, "assistant", f"arguments: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def check_call_id(call_id, i: int, role: str, version: str):
    if version == "v13":
        if not isinstance(call_id, str) or call_id in ("", "null"):
            fail(i, role, f"tool call id must be a non-empty string, got {call_id!r}")
    elif not isinstance(call_id, str) or not CALL_ID.fullmatch(call_id):
        fail(i, role, f"tool call id must be 9 letters or digits, got {call_id!r}")


def read_tools(tools) -> list[dict]:
    """The OpenAI tools list in the layout the model saw in training: type, then name, description, parameters."""
    if not isinstance(tools, list):
        raise InputError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, "
                         f"got {type(tools).__name__}")
    out = []
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            raise InputError(f"tool {k}: expected {{'type': 'function', 'function': {{'name', 'parameters', ...}}}}")
        name, description = function.get("name"), function.get("description") or ""
        parameters = {} if function.get("parameters") is None else function["parameters"]
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InputError(f"tool {k}: function name {name!r} {NAME_RULE}")
        if not isinstance(description, str):
            raise InputError(f"tool {k} ({name}): description must be a string")
        check_json(parameters, f"tool {k} ({name}) parameters")     # bounds the depth check_schema walks
        check_schema(parameters, f"tool {k} ({name}) parameters")
        function = {"name": name, "description": description, "parameters": parameters}
        out.append({"type": "function", "function": function})
    return out


def check_json(value, what: str):
    check_depth(value, what)   # before json.dumps recurses into it
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:  # sets, objects, circular references
        raise InputError(f"{what} must be JSON data: {e}") from None


def check_schema(schema, where: str):
    """A light JSON-schema check: the mistakes that make a tool unusable, not all of draft 7."""
    if isinstance(schema, bool):  # true / false are valid sub-schemas
        return
    if not isinstance(schema, dict):
        raise InputError(f"{where}: a JSON schema must be an object, got {schema!r:.60}")
    kinds = schema.get("type", [])
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if not all(isinstance(kind, str) and kind in SCHEMA_TYPES for kind in kinds):
        raise InputError(f"{where}: type {schema['type']!r} is not one of {sorted(SCHEMA_TYPES)}")
    properties, required = schema.get("properties", {}), schema.get("required", [])
    if not isinstance(properties, dict):
        raise InputError(f"{where}: properties must be an object")
    if not isinstance(required, list) or not all(isinstance(key, str) for key in required):
        raise InputError(f"{where}: required must be a list of property names")
    for key, sub in properties.items():
        check_schema(sub, f"{where}.{key}")
    if isinstance(schema.get("items"), (dict, bool)):
        check_schema(schema["items"], f"{where}[items]")


# ---------------------------------------------------------------------------------------- conversation rules

def check_order(turns: list[Turn]):
    """Who may follow whom, where a conversation may end, and that every tool result answers a call."""
    if len(turns) == 1 and turns[0].role not in ("system", "user"):
        fail(0, turns[0].role, "a conversation must start with a user or system message")
    for before, turn in zip(turns, turns[1:]):
        if turn.role not in MAY_FOLLOW[before.role]:
            fail(turn.index, turn.role, f"a {turn.role} message cannot follow a {before.role} message")
    for turn in turns[:-1]:
        if turn.prefix:
            fail(turn.index, turn.role, "only the last message can be a prefix to continue")
    last = turns[-1]
    if len(turns) > 1 and last.role == "assistant" and not last.prefix:
        fail(last.index, last.role, "the conversation ends with an assistant message; "
                                     "end with a user or tool message, or mark it {'prefix': True} to continue it")
    check_tool_results(turns)


def check_tool_results(turns: list[Turn]):
    """Each tool result answers one call of the latest assistant message; all are answered before the next."""
    pending: set[str] = set()
    for turn in turns:
        if turn.role == "tool":
            if turn.call_id not in pending:
                fail(turn.index, turn.role,
                     f"tool_call_id {turn.call_id!r} answers no open call of the previous assistant message")
            pending.remove(turn.call_id)
        elif turn.role == "assistant":
            if pending:
                fail(turn.index, turn.role, f"tool calls {sorted(pending)} have no tool result")
            ids = [call["id"] for call in turn.calls]
            if len(set(ids)) != len(ids):
                fail(turn.index, turn.role, f"duplicate tool call ids {ids}")
            pending = set(ids)


def join_turns(turns: list[Turn], version: str) -> list[Turn]:
    """Join consecutive user (and assistant) messages into one turn; order tool results by their calls."""
    merged: list[Turn] = []
    calls: list[str] = []
    for role, group in groupby(turns, key=lambda turn: turn.role):
        group = list(group)
        if role in ("user", "assistant"):
            group = [Turn(role, group[0].index, sum((t.parts for t in group), []), sum((t.calls for t in group), []),
                          prefix=any(t.prefix for t in group))]
        if role == "assistant":
            calls = [call["id"] for call in group[0].calls]
        if role == "tool" and version != "v7":  # v11+: results follow the order of the calls they answer
            group.sort(key=lambda turn: calls.index(turn.call_id))
        merged += group
    for turn in merged:
        turn.parts = join_texts(turn.parts)
        if turn.role == "assistant" and not turn.parts and not turn.calls:
            fail(turn.index, turn.role, "needs content or tool_calls")
    return merged


def join_texts(parts: list) -> list:
    """Drop empty texts and join neighbouring texts with a blank line; images and thoughts stay where they
    are, and end a text."""
    out: list = []
    for part in parts:
        if isinstance(part, str) and not part:
            continue
        if isinstance(part, str) and out and isinstance(out[-1], str):
            out[-1] += JOIN + part
        else:
            out.append(part)
    return out


# ---------------------------------------------------------------------------------------- encoding turns

def user_ids(tokenizer, parts: list, images: list) -> list[int]:
    # [text, ..., image] becomes [image, text, ...]: images come first in training data
    if len(parts) >= 2 and not isinstance(parts[-1], str) and all(isinstance(p, str) for p in parts[:-1]):
        parts = [parts[-1], *parts[:-1]]
    ids = []
    for part in parts:
        if isinstance(part, str):
            ids += tokenizer.encode(part)
        else:
            ids += image_ids(tokenizer, part)
            images.append(part)
    return ids


def image_ids(tokenizer, pixels: torch.Tensor) -> list[int]:
    """One [IMG] per merged patch, [IMG_BREAK] after each row, [IMG_END] instead of the last break."""
    rows, cols = token_grid(pixels, tokenizer.image.patch_size, tokenizer.image.spatial_merge_size)
    ids = ([tokenizer.special_id("[IMG]")] * cols + [tokenizer.special_id("[IMG_BREAK]")]) * rows
    ids[-1] = tokenizer.special_id("[IMG_END]")
    return ids


def content_ids(tokenizer, parts: list) -> list[int]:
    """Text and thinking parts. v13 writes a thought between [THINK] and [/THINK] (an open one without the
    end) and encodes each part on its own; v11 writes it into the text between <think> and </think> and
    encodes the whole text at once, as a tokenizer does the text of a chat template."""
    if tokenizer.version != "v13":
        begin, end = THINK_TAGS
        return tokenizer.encode("".join(begin + part.text + end * part.closed if isinstance(part, Thinking)
                                        else part for part in parts))
    ids = []
    for part in parts:
        if isinstance(part, Thinking):
            ids += [tokenizer.special_id("[THINK]"), *tokenizer.encode(part.text)]
            ids += [tokenizer.special_id("[/THINK]")] * part.closed
        else:
            ids += tokenizer.encode(part)
    return ids


def assistant_ids(tokenizer, turn: Turn) -> list[int]:
    special = tokenizer.special_id
    if all(isinstance(part, str) for part in turn.parts):  # trailing spaces never end a trained answer
        ids = tokenizer.encode("".join(turn.parts).rstrip(" "))
    else:  # as mistral-common, which strips only content that is all text
        ids = content_ids(tokenizer, turn.parts)
    if tokenizer.version == "v7" and turn.calls:  # all calls as one JSON list
        listed = [{"name": c["name"], "arguments": c["arguments"], "id": c["id"]} for c in turn.calls]
        ids += [special("[TOOL_CALLS]"), *tokenizer.encode(json.dumps(listed, ensure_ascii=False))]
    elif tokenizer.version != "v7":  # one [TOOL_CALLS] per call; name, id and arguments encoded apart
        for call in turn.calls:
            ids += [special("[TOOL_CALLS]"), *tokenizer.encode(call["name"])]
            if tokenizer.version == "v11":
                ids += [special("[CALL_ID]"), *tokenizer.encode(call["id"])]
            ids += [special("[ARGS]"), *tokenizer.encode(json.dumps(call["arguments"], ensure_ascii=False))]
    return ids if turn.prefix else ids + [tokenizer.eos_id]


def tool_result_ids(tokenizer, turn: Turn) -> list[int]:
    special = tokenizer.special_id
    content = tokenizer.encode("".join(turn.parts))  # verbatim, not re-serialized
    if tokenizer.version == "v13":
        return [special("[TOOL_RESULTS]"), *content, special("[/TOOL_RESULTS]")]
    call_id = tokenizer.encode(turn.call_id)
    return [special("[TOOL_RESULTS]"), *call_id, special("[TOOL_CONTENT]"), *content, special("[/TOOL_RESULTS]")]


# ---------------------------------------------------------------------------------------- reading output

@dataclass
class ToolCall:
    name: str
    arguments: Any  # the parsed JSON value; None when `error` is set
    id: str | None = None  # models rarely generate ids: the caller assigns them
    raw_arguments: str = ""  # the arguments text as generated
    error: str | None = None  # why this call could not be read


@dataclass
class AssistantOutput:
    content: str  # the answer, without reasoning and tool calls
    tool_calls: list[ToolCall]
    reasoning: str | None = None  # reasoning models: the thought, None where the answer began none

    def to_message(self, reasoning: bool = False) -> dict:
        """This turn as an assistant message to append to the conversation; its reasoning as
        `reasoning_content` only if asked (see drop_reasoning). Calls without an id get a fresh random
        one, as OpenAI-compatible servers do."""
        message: dict = {"role": "assistant", "content": self.content}
        if reasoning and self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id or new_call_id(), "type": "function",
                                      "function": {"name": call.name, "arguments": call.raw_arguments}}
                                     for call in self.tool_calls]
        return message


def new_call_id() -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=9))


def parse_output(tokenizer, ids, tags: bool = True) -> AssistantOutput:
    """Read the generated ids of one assistant turn (up to </s>, which may be absent): the reasoning and
    the content as OutputStream gives them, then the tool calls. Never raises on malformed calls: they
    come back with `error` set and the raw text kept. tags: see OutputStream."""
    ids = [int(i) for i in ids]
    if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    stream = OutputStream(tokenizer, tags)
    pieces = [piece for token in ids for piece in stream.feed(token)] + stream.close()
    reasoning, content = ("".join(text for kind, text in pieces if kind == k) for k in KINDS)
    marker = tokenizer.special_id("[TOOL_CALLS]")
    starts = [k for k, i in enumerate(ids) if i == marker]
    calls = []
    for start, end in zip(starts, starts[1:] + [len(ids)]):
        calls += parse_calls(tokenizer, ids[start + 1:end])
    return AssistantOutput(content, calls, reasoning if stream.reasoned else None)


class OutputStream:
    """One assistant turn read as it is generated: feed() takes each generated id and gives back the new
    text as (kind, text) pieces, kind "reasoning" or "content"; close() gives what was held back. Their
    concatenation, kind by kind, is what parse_output returns: a streamed answer and a whole one agree.

        stream = OutputStream(tokenizer)
        for token in generated:
            for kind, text in stream.feed(token):
                print(text, end="", file=sys.stderr if kind == "reasoning" else sys.stdout)
        stream.close()

    Reasoning is what lies between the ids of [THINK] and [/THINK] (v13), or, for a tokenizer without
    them and with tags=True, between a <think> that opens the answer (after blanks) and </think>: the
    text form of Magistral Small 2506, whose thought and answer lose their surrounding blanks as its
    template writes them on lines of their own. Text that merely holds "[THINK]" or "<think>" is content;
    an answer cut off inside its thought has reasoning and no content. The text stops at [TOOL_CALLS]
    (`calls` is then True: the rest is tool calls, for parse_output) and at </s>. Text is decoded run by
    run between special tokens, as Tokenizer.decode does; a character split across tokens comes out whole."""

    def __init__(self, tokenizer, tags: bool = True, split: bool = True):
        self.tokenizer = tokenizer
        # split False: plain text, every token's text as content (no thought, no tool calls, no end at
        # </s>): a completion's text, or an echoed prompt's
        special = (lambda name: optional_special(tokenizer, name)) if split else (lambda name: None)
        self.begin, self.end = special("[THINK]"), special("[/THINK]")
        self.tags = tags and split and self.begin is None
        self.marker, self.eos = special("[TOOL_CALLS]"), tokenizer.eos_id if split else None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.leading_space = tokenizer.leading_space
        self.kind = "content"
        self.reasoned = False  # a thought began
        self.calls = self.done = False
        self.held = ""  # text form: what may still be part of a tag, or blanks that may end a thought
        self.state = "start" if self.tags else "answer"  # text form: start, thought, after (the tag), answer

    def feed(self, token: int) -> list[tuple[str, str]]:
        if self.done or self.calls:
            return []
        if token in (self.marker, self.eos):
            self.calls = token == self.marker
            return self.close()
        if not self.tokenizer.is_special(token):
            text = self.decoder.decode(self.tokenizer.token_bytes(token))
            if self.leading_space and text:   # the space SentencePiece's encoder put in front of the text
                text, self.leading_space = text.removeprefix(" "), False
            return self.text(text)
        pieces = self.text(self.decoder.decode(b"", final=True))  # a special token ends a run of text
        if token == self.begin:
            self.kind, self.reasoned = "reasoning", True
        elif token == self.end and self.kind == "reasoning":
            self.kind = "content"
        return pieces

    def close(self) -> list[tuple[str, str]]:
        """The end of the turn: the text held back, a thought's blanks dropped."""
        if self.done:
            return []
        pieces = self.text(self.decoder.decode(b"", final=True))
        self.done = True
        held, self.held = self.held, ""
        if self.state == "thought":   # cut off in the thought: what it held, but the blanks that end it
            held = held.rstrip()
            return pieces + [("reasoning", held)] * bool(held)
        return pieces + [(self.kind, held)] * bool(held and self.state == "start")

    def text(self, text: str) -> list[tuple[str, str]]:
        if not self.tags:
            return [(self.kind, text)] if text else []
        return self.tagged(self.held + text)

    def tagged(self, text: str) -> list[tuple[str, str]]:
        """The text form: a state machine over the text, holding back what it cannot judge yet."""
        begin, end = THINK_TAGS
        self.held = ""
        if self.state == "start":
            opening = text.lstrip()
            if len(opening) < len(begin) and begin.startswith(opening):   # blanks, or the start of <think>
                self.held = text
                return []
            if not opening.startswith(begin):
                self.state = "answer"
                return [("content", text)]
            self.state, self.reasoned, text = "thought", True, opening[len(begin):]
        pieces = []
        if self.state == "thought":
            if self.kind == "content":  # nothing of the thought shown yet: its leading blanks go
                text = text.lstrip()
            thought, closed, text = text.partition(end)
            if not closed:   # hold what may start </think>, and blanks that may end the thought
                keep = len(thought) - partial_suffix(thought, end)
                keep = len(thought[:keep].rstrip())
                thought, self.held = thought[:keep], thought[keep:]
            thought = thought.rstrip() if closed else thought
            if thought:
                self.kind = "reasoning"
                pieces.append(("reasoning", thought))
            if not closed:
                return pieces
            self.state, self.kind = "after", "content"
        if self.state == "after":  # the answer loses its leading blanks
            text = text.lstrip()
            if not text:
                return pieces
            self.state = "answer"
        return pieces + [("content", text)] * bool(text)


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a beginning of `tag` (shorter than tag)."""
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])), 0)


def drop_reasoning(messages: list) -> list:
    """The conversation without the reasoning of its assistant messages (thinking parts, reasoning_content,
    reasoning): the default of the CLI's and the server's --keep-reasoning, as earlier thoughts fill the
    context and the model card leaves the choice to the user. A final prefix message keeps its thought:
    the model is continuing it. An assistant message left with nothing is left out. The messages are not
    changed; anything that is not an assistant message passes as it is, for encode_chat to judge."""
    out = []
    for k, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") != "assistant"
                or (k == len(messages) - 1 and message.get("prefix") is True)):
            out.append(message)
            continue
        message = {key: value for key, value in message.items() if key not in REASONING_FIELDS}
        if isinstance(message.get("content"), list):
            message["content"] = [part for part in message["content"]
                                  if not (isinstance(part, dict) and part.get("type") == "thinking")]
        if message.get("content") or message.get("tool_calls"):
            out.append(message)
    return out


def parse_calls(tokenizer, ids: list[int]) -> list[ToolCall]:
    """The ids after one [TOOL_CALLS]: `name[CALL_ID]id[ARGS]arguments` (v11+) or a JSON list (v7)."""
    args, call_id = optional_special(tokenizer, "[ARGS]"), optional_special(tokenizer, "[CALL_ID]")
    if args is None or args not in ids:
        return json_calls(tokenizer.decode(ids))
    head, raw = ids[:ids.index(args)], tokenizer.decode(ids[ids.index(args) + 1:])
    found_id = None
    if call_id in head:
        head, found_id = head[:head.index(call_id)], tokenizer.decode(head[head.index(call_id) + 1:])
    try:
        return [ToolCall(tokenizer.decode(head), generated_json(raw), found_id, raw)]
    except ValueError as e:
        return [ToolCall(tokenizer.decode(head), None, found_id, raw, f"arguments are not valid JSON: {e}")]


def generated_json(text: str):
    """The JSON value a model wrote; a ValueError if it is not JSON or nested past MAX_DEPTH (json.loads
    would exhaust the stack on a long run of '[')."""
    if json_depth(text.encode("utf-8", "surrogatepass")) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return json.loads(text)


def json_calls(text: str) -> list[ToolCall]:
    try:
        value = generated_json(text)
    except ValueError as e:
        return [ToolCall("", None, None, text, f"tool calls are not valid JSON: {e}")]
    calls = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            arguments, call_id = item.get("arguments", {}), item.get("id")
            calls.append(ToolCall(item["name"], arguments, call_id if isinstance(call_id, str) else None,
                                  json.dumps(arguments, ensure_ascii=False)))
        else:
            calls.append(ToolCall("", None, None, json.dumps(item, ensure_ascii=False),
                                  "a tool call must be an object with a name"))
    return calls


def optional_special(tokenizer, name: str) -> int | None:
    try:
        return tokenizer.special_id(name)
    except InputError:  # v7 has no [ARGS] / [CALL_ID]
        return None


# ---------------------------------------------------------------------------------------- system prompt

def load_system_prompt(path, name: str, today: date | None = None) -> str | list[dict]:
    """SYSTEM_PROMPT.txt (or a model folder holding it) with {name}, {today} and {yesterday} filled in.
    `name` is the model name or repo id ("mistralai/Mistral-Small-3.2-24B-Instruct-2506"); dates are YYYY-MM-DD.
    The prompt of Magistral Small 2507 and 2509 shows the model its answer's layout with a thought in it,
    "...[THINK]Your thoughts...[/THINK]Here, ...": that comes back as content parts, text, a thinking part
    and text, as the model cards load it (this file is the model's own; user text is never read so)."""
    path = Path(path)
    path = path / "SYSTEM_PROMPT.txt" if path.is_dir() else path
    text = read_text(path, what=f"system prompt file {path}")   # a FIFO is refused, never opened
    today = today or date.today()
    fields = {"{name}": name.split("/")[-1], "{today}": f"{today:%Y-%m-%d}",
              "{yesterday}": f"{today - timedelta(days=1):%Y-%m-%d}"}
    for key, value in fields.items():  # not str.format: Magistral's prompt holds a literal "\boxed{}"
        text = text.replace(key, value)
    before, begin, rest = text.partition("[THINK]")
    thought, end, after = rest.partition("[/THINK]")
    if not (begin and end):
        return text
    return [{"type": "text", "text": before}, {"type": "thinking", "thinking": thought, "closed": True},
            {"type": "text", "text": after}]
