"""Chat layout: OpenAI-style conversations -> token ids and images, and generated ids -> text and tool calls.

encode_chat() gives, token for token, what mistral-common's encode_chat_completion gives for the same
conversation; parse_output() reads one generated assistant turn back; load_system_prompt() fills the
model repository's SYSTEM_PROMPT.txt. The layout depends on the tokenizer version:
v7 (Mistral Small 3.1), v11 (Mistral Small 3.2, Magistral Small 2506), v13 (later releases).

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
"""
import codecs
import json
import random
import re
import string
import sys
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
class Turn:
    """One checked message. `parts` holds text (str) and image tensors [3, H, W], in order."""
    role: str  # system | user | assistant | tool
    index: int  # position of the (first) message in the caller's list, for error messages
    parts: list = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)  # assistant: {"id", "name", "arguments"}
    call_id: str | None = None  # tool: the call it answers
    prefix: bool = False  # assistant: the model continues it


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None
                ) -> tuple[list[int], list[torch.Tensor]]:
    """Token ids of the prompt, and its images as pixel tensors [3, H, W] in prompt order."""
    version = tokenizer.version
    if version not in VERSIONS:
        raise InputError(f"no chat layout for tokenizer version {version!r}; expected one of {VERSIONS}")
    tool_list = read_tools(tools) if tools is not None else []
    tools_json = json.dumps(tool_list, ensure_ascii=False) if tool_list else None
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    turns = [read_message(tokenizer, message, i) for i, message in enumerate(messages)]
    check_order(turns)
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
            ids += [special("[SYSTEM_PROMPT]"), *tokenizer.encode("".join(turn.parts)), special("[/SYSTEM_PROMPT]")]
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
        else:
            fail(i, role, f"part {k}: expected a 'text', 'image_url' or 'image' part, got {part!r:.80}")
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
    """Drop empty texts and join neighbouring texts with a blank line; images stay where they are."""
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


def assistant_ids(tokenizer, turn: Turn) -> list[int]:
    special = tokenizer.special_id
    ids = tokenizer.encode("".join(turn.parts).rstrip(" "))  # trailing spaces never end a trained answer
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
    reasoning: str | None = None  # Magistral: the text between <think> and </think>

    def to_message(self) -> dict:
        """This turn as an assistant message to append to the conversation (reasoning left out).
        Calls without an id get a fresh random one, as OpenAI-compatible servers do."""
        message: dict = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id or new_call_id(), "type": "function",
                                      "function": {"name": call.name, "arguments": call.raw_arguments}}
                                     for call in self.tool_calls]
        return message


def new_call_id() -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=9))


def parse_output(tokenizer, ids) -> AssistantOutput:
    """Read the generated ids of one assistant turn (up to </s>, which may be absent). Never raises on
    malformed calls: they come back with `error` set and the raw text kept."""
    ids = [int(i) for i in ids]
    if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    marker = tokenizer.special_id("[TOOL_CALLS]")
    starts = [k for k, i in enumerate(ids) if i == marker]
    reasoning, content = split_reasoning(tokenizer.decode(ids[:starts[0]] if starts else ids))
    calls = []
    for start, end in zip(starts, starts[1:] + [len(ids)]):
        calls += parse_calls(tokenizer, ids[start + 1:end])
    return AssistantOutput(content, calls, reasoning)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Magistral answers '<think>\\n...\\n</think>\\nanswer' in plain text; a cut-off thought has no answer."""
    if not text.lstrip().startswith("<think>"):
        return None, text
    thought, closed, answer = text.lstrip()[len("<think>"):].partition("</think>")
    return thought.strip(), (answer.lstrip() if closed else "")


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


# ---------------------------------------------------------------------------------------- streaming text

class TextStream:
    """Generated ids as text as they come, written piece by piece (printed by default); a UTF-8
    character split across tokens is written once complete. Control tokens write nothing."""

    def __init__(self, tokenizer, write=None):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.write = write or (lambda text: print(text, end="", flush=True))

    def __call__(self, token: int):
        if not self.tokenizer.is_special(token):
            self.write(self.decoder.decode(self.tokenizer.token_bytes(token)))

    def flush(self):
        self.write(self.decoder.decode(b"", final=True))


class ReasoningSplit:
    """For Magistral: text between <think> and </think> goes to stderr, the answer to stdout."""

    def __init__(self):
        self.buffer, self.thinking = "", False

    def __call__(self, text: str):
        self.buffer += text
        while self.buffer:
            tag = "</think>" if self.thinking else "<think>"
            i = self.buffer.find(tag)
            if i < 0:
                keep = partial_suffix(self.buffer, tag)   # hold back what may be the start of a tag
                self._emit(self.buffer[:len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return
            self._emit(self.buffer[:i])
            self.buffer, self.thinking = self.buffer[i + len(tag):], not self.thinking

    def _emit(self, text: str):
        print(text, end="", flush=True, file=sys.stderr if self.thinking else sys.stdout)


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a beginning of `tag` (shorter than tag)."""
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])), 0)


# ---------------------------------------------------------------------------------------- system prompt

def load_system_prompt(path, name: str, today: date | None = None) -> str:
    """SYSTEM_PROMPT.txt (or a model folder holding it) with {name}, {today} and {yesterday} filled in.
    `name` is the model name or repo id ("mistralai/Mistral-Small-3.2-24B-Instruct-2506"); dates are YYYY-MM-DD."""
    path = Path(path)
    path = path / "SYSTEM_PROMPT.txt" if path.is_dir() else path
    text = read_text(path, what=f"system prompt file {path}")   # a FIFO is refused, never opened
    today = today or date.today()
    fields = {"{name}": name.split("/")[-1], "{today}": f"{today:%Y-%m-%d}",
              "{yesterday}": f"{today - timedelta(days=1):%Y-%m-%d}"}
    for key, value in fields.items():  # not str.format: Magistral's prompt holds a literal "\boxed{}"
        text = text.replace(key, value)
    return text
