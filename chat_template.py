"""Does a Jinja chat template produce the official prompt? A checker, from Python and the command line.

Most people get their prompt from a Jinja chat template: transformers' tokenizer_config.json, a
chat_template.jinja or chat_template.json, or, with llama.cpp and Ollama, `tokenizer.chat_template` inside a
GGUF file. This module renders a template over a built-in suite of reference conversations exactly as
transformers' `apply_chat_template` renders it, tokenizes the text, and compares the ids with
`chat.encode_chat`, which gives mistral-common's prompt token for token.

    python chat_template.py chat_template.jinja --tokenizer v11        # or tekken.json, a .gguf, a .json

    results = check_chat_template(read_template("model.gguf"), "path/to/tekken.json")
    [(r.name, r.equal, r.first_difference, r.error) for r in results]

The rendered text is trusted template output, so its control-token strings ("[INST]", "</s>") become control
tokens here, and only here: the text between them is encoded with `tokenizer.encode`, which never parses
control tokens, and the project's prompts never pass through this module.

Images: a template writes one [IMG] per image, since it cannot know the image's size; encode_chat writes
rows x cols [IMG] tokens with [IMG_BREAK] and [IMG_END]. Both sides are compared with each image's run
collapsed to one [IMG], so the order of images and text is checked, not the grid.

Tool-call arguments given as a JSON string are written in json.dumps' layout (what the model generated and
the client echoes back): encode_chat re-serializes them, a template can only copy them.
"""
import argparse
import base64
import copy
import importlib.util
import io
import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

from chat import VERSIONS, encode_chat, optional_special
from gguf_header import read_header
from inputs import InputError, MissingFileError, read_json, read_text, regular_file
from tokenizer import BUILTIN_SPECIALS, Tekken, Tokenizer

FIXED_NOW = datetime(2025, 6, 20, 12, 0)  # what strftime_now sees, so a template's date never varies
GGUF_KEY = "tokenizer.chat_template"
CONTEXT = 12  # tokens shown on each side of a difference
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message


# ---------------------------------------------------------------------------------------- reading templates

def read_template(path) -> str:
    """The chat template in a .jinja file, a tokenizer_config.json or chat_template.json, or a GGUF file."""
    if not Path(path).exists():
        raise MissingFileError(f"template file not found: {path}")
    path = regular_file(path, f"template file {path}")   # a FIFO is never opened
    with open(path, "rb") as f:
        is_gguf = f.read(4) == b"GGUF"
    if is_gguf or path.suffix == ".gguf":
        template = read_header(path).metadata.get(GGUF_KEY)
        if not isinstance(template, str):
            raise InputError(f"{path}: the GGUF metadata has no string {GGUF_KEY!r}")
    elif path.suffix == ".json":
        template = json_template(path)
    else:
        template = read_text(path, what=str(path))
    if not template.strip():
        raise InputError(f"{path}: the chat template is empty")
    return template


def json_template(path: Path) -> str:
    """`chat_template` of a tokenizer_config.json or chat_template.json: a string, or a list of named
    templates (older tokenizer_config.json files) of which transformers uses "default"."""
    data = read_json(path)
    template = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        raise InputError(f"{path}: no 'chat_template' string (expected a tokenizer_config.json or "
                         "chat_template.json holding one)")
    return template




# ---------------------------------------------------------------------------------------- tokenizers

def load_tokenizer(spec) -> Tokenizer:
    """A Tokenizer as given, a tekken.json path (or a folder holding one), or a version name: v7, v11, v13."""
    if isinstance(spec, Tokenizer):
        tokenizer = spec
    elif str(spec) in VERSIONS:
        tokenizer = shipped_tokenizer(str(spec))
    else:
        tokenizer = tokenizer_file(spec)
    if tokenizer.version not in VERSIONS:
        raise InputError(f"{spec}: tokenizer version {tokenizer.version} has no chat layout "
                         f"(encode_chat knows {', '.join(VERSIONS)})")
    return tokenizer


def tokenizer_file(spec) -> Tokenizer:
    path = Path(spec)
    path = path / "tekken.json" if path.is_dir() else path
    if not path.is_file():
        raise MissingFileError(f"tokenizer not found: {spec} (give a tekken.json or one of {', '.join(VERSIONS)})")
    return Tokenizer.from_file(path)   # its errors name the file


@lru_cache(maxsize=None)
def shipped_tokenizer(version: str) -> Tokenizer:
    """The official layout of a Small 3.x tekken.json: mistral-common's shipped Tekken vocabulary (the same
    in every release) with the special tokens and image section of `version`. v13 gets the v11 list: the
    tokens later files add are not needed here."""
    spec = importlib.util.find_spec("mistral_common")  # only its data file is used: no import
    if spec is None:
        raise InputError(f"--tokenizer {version} builds on mistral-common's shipped vocabulary; "
                         "pip install mistral-common, or give a tekken.json")
    vocabulary = Path(spec.submodule_search_locations[0]) / "data" / "tekken_240911.json"
    data = read_json(vocabulary)
    data["config"]["version"] = version
    names = dict(enumerate(BUILTIN_SPECIALS))
    if version != "v7":
        names.update({32: "[ARGS]", 33: "[CALL_ID]"})
    n_special = data["config"]["default_num_special_tokens"]
    data["special_tokens"] = [{"rank": i, "token_str": names.get(i, f"<SPECIAL_{i}>"), "is_control": True}
                              for i in range(n_special)]
    data["image"] = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
    return Tekken(vocabulary, data)


# ---------------------------------------------------------------------------------------- rendering

class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which marks assistant text for training masks: rendered as
    its body, in its own scope, as transformers' AssistantTracker does when no mask is asked for."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' override: plain json.dumps, where Jinja's own tojson HTML-escapes < > & '."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format: str) -> str:
    return FIXED_NOW.strftime(format)


def compile_template(source: str) -> jinja2.Template:
    """The template in transformers' environment: sandboxed, trim_blocks, lstrip_blocks, loop controls."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(source)


def render(source: str, template: jinja2.Template, messages: list[dict], tools: list[dict] | None,
           tokens: dict[str, str], continue_final: bool = False) -> str:
    """The text apply_chat_template(messages, tools, tokenize=False) gives, with add_generation_prompt
    unless the final assistant message is continued (continue_final_message). As there, the template also
    sees `documents` (None)."""
    # as apply_chat_template: keys set to None are dropped, reasoning gets its aliases, inputs are copied
    messages = [alias_reasoning({key: copy.deepcopy(value) for key, value in message.items() if value is not None})
                for message in messages]
    variables = dict(tools=copy.deepcopy(tools), documents=None, **tokens)
    if continue_final:
        return render_continued(source, template, messages, variables)
    return template.render(messages=messages, add_generation_prompt=True, **variables)


def render_conversation(source: str, template: jinja2.Template, tokenizer, messages: list[dict],
                        tools: list[dict] | None) -> str:
    """The template's text for a suite conversation; encode_chat's "prefix" flag on the final assistant
    message becomes continue_final_message."""
    continued = bool(messages[-1].get("prefix"))
    shown = [{key: value for key, value in message.items() if key != "prefix"} for message in messages]
    return render(source, template, shown, tools, special_tokens(tokenizer), continued)


def alias_reasoning(message: dict) -> dict:
    """transformers fills `reasoning_content` and `thinking` from whichever reasoning field a message has."""
    reasoning = next((message[key] for key in ("reasoning_content", "thinking", "reasoning")
                      if message.get(key) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render_continued(source: str, template: jinja2.Template, messages: list[dict], variables: dict) -> str:
    """transformers' continue_final_message: tag the final message's text, render, cut right after it."""
    if "content" not in source:
        raise ValueError("continue_final_message: the template never reads 'content'")
    final = messages[-1].get("content")
    if isinstance(final, list):
        block = next((b for b in reversed(final) if isinstance(b, dict) and "text" in b), None)
        if block is None:
            raise ValueError("continue_final_message: the final message has no text to continue")
        final, block["text"] = block["text"], block["text"] + CONTINUE_TAG
    elif isinstance(final, str):
        messages[-1]["content"] = final + CONTINUE_TAG
    else:
        raise ValueError("continue_final_message: the final message has no content to continue")
    rendered = template.render(messages=messages, add_generation_prompt=False, **variables)
    tag = CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise ValueError("continue_final_message: the template drops part of the final message")
    cut = rendered.rindex(tag)
    return rendered[:cut] if rendered[cut:cut + len(CONTINUE_TAG)] == CONTINUE_TAG else rendered[:cut].rstrip()


def special_tokens(tokenizer) -> dict[str, str]:
    """bos_token, eos_token, unk_token and pad_token as the template sees them (no pad where the file has none)."""
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "unk_token": tokenizer.unk_id,
           "pad_token": tokenizer.pad_id}
    return {name: tokenizer.special_name(token) for name, token in ids.items() if token >= 0}


# ---------------------------------------------------------------------------------------- tokenizing rendered text

@lru_cache(maxsize=16)
def control_pattern(tokenizer) -> re.Pattern:
    """Matches any special-token string of the tokenizer, longer names first, so that a name holding a
    shorter one ("<SPECIAL_100>" holds no "<SPECIAL_10>" match) is matched whole."""
    names = [tokenizer.special_name(i) for i in range(tokenizer.n_words) if tokenizer.is_special(i)]
    return re.compile("(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + ")")


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Ids of a template's output: its control-token strings as control tokens, the text between encoded
    as text. Only for template output: typed text must never become control tokens."""
    ids = []
    for k, piece in enumerate(control_pattern(tokenizer).split(text)):  # text, token, text, token, ..., text
        if k % 2:
            ids.append(tokenizer.special_id(piece))
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


def collapse_images(tokenizer, ids: list[int]) -> list[int]:
    """Each image's run [IMG]...[IMG_BREAK]...[IMG_END] becomes one [IMG]; a lone [IMG] stays as it is."""
    img, brk, end = (optional_special(tokenizer, name) for name in ("[IMG]", "[IMG_BREAK]", "[IMG_END]"))
    out, i = [], 0
    while i < len(ids):
        j = i  # the end of the [IMG]/[IMG_BREAK] run starting at i
        while ids[i] == img and j < len(ids) and ids[j] in (img, brk):
            j += 1
        whole_image = j > i and j < len(ids) and ids[j] == end
        out.append(img if whole_image else ids[i])
        i = j + 1 if whole_image else i + 1
    return out


# ---------------------------------------------------------------------------------------- the suite

@lru_cache(maxsize=None)
def image_url() -> str:
    """A 56 x 56 PNG as a data: URL: 2 x 2 image tokens ([IMG][IMG][IMG_BREAK][IMG][IMG][IMG_END])."""
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 60, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image() -> dict:
    return {"type": "image_url", "image_url": {"url": image_url()}}


def system(content) -> dict:
    return {"role": "system", "content": content}


def user(content) -> dict:
    return {"role": "user", "content": content}


def assistant(content, calls: list | None = None, prefix: bool = False) -> dict:
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    if prefix:
        message["prefix"] = True  # encode_chat's flag; the template gets continue_final_message instead
    return message


def call(arguments) -> dict:
    return {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


def result(content: str) -> dict:
    return {"role": "tool", "tool_call_id": "abcDEF123", "content": content}


# In the layout encode_chat writes tools (type, then name, description, parameters), with the characters
# that HTML escaping and ensure_ascii change, so those bugs show.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city, e.g. 'Paris' -> <temperature> & <sky>.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Zürich"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
SYSTEM = system("You are a helpful assistant.")
ARGUMENTS = {"city": "Zürich", "unit": "celsius"}
WEATHER_RESULT = '{"temperature": 21, "sky": "sunny"}'


def tool_round(arguments) -> list[dict]:
    return [SYSTEM, user("What's the weather in Zürich?"), assistant(None, [call(arguments)]), result(WEATHER_RESULT),
            assistant("It is 21 °C and sunny in Zürich."), user("Thanks! Should I take an umbrella?")]


def suite(with_images: bool = True) -> dict[str, tuple[list[dict], list[dict] | None]]:
    """name -> (messages, tools): what chat templates get wrong, each in one conversation. All but the first
    have a system prompt, so that a template's default system prompt shows only there."""
    conversations = {
        "no_system": ([user("Hello, how are you?")], None),
        "system_prompt": ([SYSTEM, user("Hello, how are you?")], None),
        "multi_turn": ([system("Be brief."), user("Hi!"), assistant("Hello! How can I help?"), user("What is 2+2?"),
                        assistant("4."), user("And times 3?")], None),
        "system_text_parts": ([system([text("You are a helpful assistant."), text("Answer in French.")]),
                               user("Hello!")], None),
        "tool_call_arguments_string": (tool_round(json.dumps(ARGUMENTS, ensure_ascii=False)), [WEATHER]),
        "tool_call_arguments_dict": (tool_round(dict(ARGUMENTS)), [WEATHER]),
        "ends_at_tool_result": (tool_round(dict(ARGUMENTS))[:4], [WEATHER]),
        "image_then_text": ([SYSTEM, user([image(), text("What is in this picture?")])], None),
        "text_then_image": ([SYSTEM, user([text("What is in this picture?"), image()])], None),
        "consecutive_users": ([SYSTEM, user("Here is my question."), user("What is the capital of France?")], None),
        "assistant_prefix": ([SYSTEM, user("Name three fruits."), assistant("Sure: 1. Apple", prefix=True)], None),
        "reasoning_earlier_turn": ([
            system("First draft your thinking process between <think> and </think>, then answer."),
            user("What is 2+2?"), assistant("<think>\nTwo plus two makes four.\n</think>\n\nThe answer is 4."),
            user("And 3+3?")], None),
    }
    if not with_images:
        conversations = {name: c for name, c in conversations.items() if "image_url" not in repr(c)}
    return conversations


# ---------------------------------------------------------------------------------------- comparing

@dataclass
class Result:
    """The verdict on one conversation. Indices count each image as one [IMG]."""
    name: str
    equal: bool
    first_difference: int | None = None  # index of the first differing token
    error: str | None = None  # the template's own error, when it failed to render
    diagnosis: str | None = None  # a likely cause, where it is recognisable
    before: str = ""  # the decoded tokens before the difference
    expected: str = ""  # the next tokens of the official prompt
    got: str = ""  # the next tokens of the template's prompt


def check_chat_template(template: str, tokenizer) -> list[Result]:
    """Render `template` (its text) over the suite and compare each prompt with encode_chat's. `tokenizer` is
    a Tokenizer, a tekken.json path or a version name. Image conversations are left out for a tokenizer
    without image support."""
    tokenizer = load_tokenizer(tokenizer)
    conversations = suite(with_images=tokenizer.image is not None)
    try:
        compiled = compile_template(template)
    except jinja2.TemplateSyntaxError as e:
        return [Result(name, False, error=f"the template does not compile: line {e.lineno}: {e.message}")
                for name in conversations]
    return [check_conversation(template, compiled, tokenizer, name, messages, tools)
            for name, (messages, tools) in conversations.items()]


def check_conversation(source: str, template: jinja2.Template, tokenizer, name: str, messages: list[dict],
                       tools: list[dict] | None) -> Result:
    expected = collapse_images(tokenizer, encode_chat(tokenizer, messages, tools)[0])
    try:
        rendered = render_conversation(source, template, tokenizer, messages, tools)
    except Exception as e:  # whatever the template's code raises is the template's error
        error = f"{type(e).__name__}: {e}"
        return Result(name, False, error=error, diagnosis=diagnose_error(messages, error))
    got = collapse_images(tokenizer, encode_rendered(tokenizer, rendered))
    index = first_difference(expected, got)
    if index is None:
        return Result(name, True)

    def shown_text(ids):
        return tokenizer.decode(ids, special="keep")

    return Result(name, False, index, diagnosis=diagnose(tokenizer, messages, expected, got, index),
                  before=shown_text(expected[max(0, index - CONTEXT):index]),
                  expected=shown_text(expected[index:index + CONTEXT]), got=shown_text(got[index:index + CONTEXT]))


def first_difference(a: list[int], b: list[int]) -> int | None:
    index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return None if a == b else index


# ---------------------------------------------------------------------------------------- diagnosis

HTML_ESCAPES = ("&#34;", "&quot;", "&#39;", "&lt;", "&gt;", "&amp;", r"\u003c", r"\u003e", r"\u0026", r"\u0027")
WINDOW = 60  # tokens after the difference that the diagnosis reads


def diagnose(tokenizer, messages: list[dict], expected: list[int], got: list[int], index: int) -> str:
    """A likely cause of the first difference, in words: the bugs chat templates are known for first."""
    def name_at(ids):
        return tokenizer.special_name(ids[index]) if index < len(ids) and tokenizer.is_special(ids[index]) else None

    def next_text(ids):
        return tokenizer.decode(ids[index:index + WINDOW], special="keep")

    want_token, got_token = name_at(expected), name_at(got)
    want, have = next_text(expected), next_text(got)
    tokens = {want_token, got_token}
    roles = [message["role"] for message in messages]
    inside = section(tokenizer, expected, index)
    if got_token == "[SYSTEM_PROMPT]" and "system" not in roles:
        return "a default system prompt is injected (the conversation has none)"
    if any(mark in have and mark not in want for mark in HTML_ESCAPES):
        return "JSON is HTML-escaped (by |e, by a |safe value joined with +, or by Jinja's own tojson)"
    if re.search(r"\\u[0-9a-fA-F]{4}", have) and not re.search(r"\\u[0-9a-fA-F]{4}", want):
        return "non-ASCII characters are escaped as \\uXXXX (tojson with ensure_ascii=True)"
    if '\\"' in have and '\\"' not in want:
        return "JSON double-encoded: tool-call arguments given as a JSON string were dumped again with tojson"
    if "[TOOL_CALLS]" in tokens or inside in ("[TOOL_CALLS]", "[CALL_ID]", "[ARGS]"):
        return tool_call_layout(tokenizer.version, have)
    if "[TOOL_RESULTS]" in tokens or inside in ("[TOOL_RESULTS]", "[TOOL_CONTENT]"):
        return "the tool-result layout differs"
    if "[AVAILABLE_TOOLS]" in tokens:
        where = "the first" if tokenizer.version == "v13" else "the last"
        return f"the [AVAILABLE_TOOLS] block is misplaced (it goes right before {where} user message)"
    if "[IMG]" in tokens:
        return "the image is misplaced (a message's text-then-image is written image first)"
    inst = optional_special(tokenizer, "[INST]")
    if consecutive_users(roles) and got.count(inst) > expected.count(inst):
        return "consecutive user messages are not joined into one [INST] (their texts join with a blank line)"
    if "<s>" in tokens:
        return "the prompt must start with exactly one <s>"
    if inside == "[SYSTEM_PROMPT]" or tokens & {"[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"}:
        return system_prompt_change(want, have)
    if index >= len(expected) and messages[-1].get("prefix"):
        return "the final assistant prefix is not left open (text written after it)"
    if "<think>" in want and "<think>" not in have:
        return "the reasoning (<think>...</think>) of an earlier assistant turn is dropped"
    if "</s>" in tokens:
        return "an assistant turn's </s> is missing or extra"
    if want.split() == have.split():
        return "only whitespace differs"
    return f"the text differs inside {inside or 'the prompt'}"


def diagnose_error(messages: list[dict], error: str) -> str | None:
    roles = [message["role"] for message in messages]
    if "alternate" in error and consecutive_users(roles):
        return "the template refuses consecutive user messages (the official prompt joins them)"
    if "no attribute 'content'" in error and any(m.get("tool_calls") and m.get("content") is None for m in messages):
        return "the template needs content in an assistant message that only calls tools (clients send none)"
    if "'str object' has no attribute" in error:
        return "the template reads a string content as a list of parts"
    return None


def consecutive_users(roles: list[str]) -> bool:
    return any(a == b == "user" for a, b in zip(roles, roles[1:]))


def system_prompt_change(want: str, have: str) -> str:
    """Where the system prompt ends in the official text and in the template's, from the difference on."""
    ends = [shown.find("[/SYSTEM_PROMPT]") % (len(shown) + 1) for shown in (want, have)]  # not seen: the end
    if ends[1] < ends[0]:
        return "the system prompt is cut short (a text part left out?)"
    if ends[1] > ends[0]:
        return "text is added to the system prompt"
    return "the system prompt's text differs"


def tool_call_layout(version: str, have: str) -> str:
    if version != "v7" and re.match(r"(\[TOOL_CALLS\])? ?\[\{", have):  # from the difference on
        return f"v7-style tool calls (one JSON list) on a {version} tokenizer, which writes [TOOL_CALLS]name...[ARGS]"
    if version == "v7" and "[ARGS]" in have:
        return "v11-style tool calls ([TOOL_CALLS]name...[ARGS]) on a v7 tokenizer, which writes one JSON list"
    if version == "v11" and "[ARGS]" in have and "[CALL_ID]" not in have:
        return "tool calls without [CALL_ID]id (the v13 layout) on a v11 tokenizer"
    if version == "v13" and "[CALL_ID]" in have:
        return "tool calls with [CALL_ID]id (the v11 layout) on a v13 tokenizer"
    return "the tool-call layout differs"


def section(tokenizer, ids: list[int], index: int) -> str | None:
    """The control token that opens the part of the prompt holding position `index` (images skipped)."""
    skipped = {optional_special(tokenizer, name) for name in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")}
    opener = next((i for i in reversed(ids[:index]) if tokenizer.is_special(i) and i not in skipped), None)
    return None if opener is None else tokenizer.special_name(opener)


# ---------------------------------------------------------------------------------------- the command line

def format_report(results: list[Result]) -> str:
    width = max(len(r.name) for r in results) + 2
    lines = []
    for r in results:
        if r.equal:
            lines.append(f"  {r.name:<{width}}equal")
        elif r.error is not None:
            because = f" ({r.diagnosis})" if r.diagnosis else ""
            lines.append(f"  {r.name:<{width}}template error: {r.error}{because}")
        else:
            lines.append(f"  {r.name:<{width}}differs at token {r.first_difference}: {r.diagnosis}")
            lines += [f"      before    {r.before!r}", f"      official  {r.expected!r}", f"      template  {r.got!r}"]
    equal, failed = sum(r.equal for r in results), sum(r.error is not None for r in results)
    lines.append(f"{equal} equal, {len(results) - equal - failed} differ, {failed} fail to render "
                 f"(of {len(results)} conversations)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check that a chat template gives the official Mistral prompt.")
    parser.add_argument("template", help="a .jinja file, tokenizer_config.json, chat_template.json or .gguf file")
    parser.add_argument("--tokenizer", default="v11",
                        help="a tekken.json, or v7 (Small 3.1), v11 (Small 3.2, Magistral), v13 (default: v11)")
    args = parser.parse_args(argv)
    try:
        template = read_template(args.template)
        tokenizer = load_tokenizer(args.tokenizer)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = check_chat_template(template, tokenizer)
    print(f"{args.template} with a {tokenizer.version} tokenizer:")
    if tokenizer.image is None:
        print("  (image conversations left out: this tokenizer has no image support)")
    print(format_report(results))
    return 0 if all(r.equal for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
