"""chat_template.py: renders as transformers' apply_chat_template, tokenizes as transformers' tokenizer, and
catches the known template bugs.

The always-on tests use small templates written here: a correct one, and copies of it each with one known
bug. The real templates in circulation are read from ../shared/chat_templates when that folder exists
(third-party files, never copied into this repository).
"""
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pytest
import transformers.utils.chat_template_utils as hf_chat
from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

import chat_template
from chat_template import (check_chat_template, collapse_images, compile_template, encode_rendered,
                           read_template, render_conversation, shipped_tokenizer, suite)
from gguf_header import read_header
from inputs import InputError
from tekken_files import write_tekken
from tokenizer import Tokenizer

SHARED = Path(__file__).parents[2] / "shared" / "chat_templates"
# the real templates, and the tokenizer each targets (see SHARED / "README.md")
TARGETS = {
    "llamacpp-Mistral-Small-3.2-24B-Instruct-2506.jinja": "v11",
    "llamacpp-mistralai-Mistral-Small-3.1-24B-Instruct-2503.jinja": "v7",
    "llamacpp-unsloth-mistral-Devstral-Small-2507.jinja": "v13",
    "mistral-common-generated-v11.jinja": "v11",
    "mistral-common-generated-v7.jinja": "v7",
    "mistral-common-tests-v11_image.jinja": "v11",
    "mistral-common-tests-v11_image_think.jinja": "v11",
    "mistral-common-tests-v11_think.jinja": "v11",
    "mistral-common-tests-v7_image.jinja": "v7",
    "transformers-test-Mistral-Small-3.1-2503-processor.jinja": "v7",
    "vllm-examples-tool_chat_template_mistral3.jinja": "v7",
}
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")

# ---------------------------------------------------------------------------------------- our templates

CORRECT = r"""{#- The Mistral Small 3.2 (v11) prompt. -#}
{%- set ns = namespace(turns=[], last_user=-1, user=-1) %}
{%- for message in messages %}
    {%- set parts = [{'type': 'text', 'text': message['content']}] if message['content'] is string
                    else (message['content'] or []) %}
    {%- if ns.turns and ns.turns[-1]['role'] == 'user' and message['role'] == 'user' %}
        {%- set ns.turns = ns.turns[:-1] + [{'role': 'user', 'parts': ns.turns[-1]['parts'] + parts}] %}
    {%- else %}
        {%- set ns.turns = ns.turns + [dict(message, parts=parts)] %}
    {%- endif %}
{%- endfor %}
{%- for turn in ns.turns if turn['role'] == 'user' %}
    {%- set ns.last_user = loop.index0 %}
{%- endfor %}
{%- macro render_parts(parts) %}
    {%- set state = namespace(after_text=false) %}
    {%- for part in parts %}
        {%- if part['type'] == 'text' and part['text'] %}
            {{- '\n\n' if state.after_text }}{{- part['text'] }}
            {%- set state.after_text = true %}
        {%- elif part['type'] != 'text' %}
            {{- '[IMG]' }}
            {%- set state.after_text = false %}
        {%- endif %}
    {%- endfor %}
{%- endmacro %}
{%- macro user_parts(parts) %}
    {%- set texts = parts[:-1]|selectattr('type', 'equalto', 'text')|list %}
    {%- if parts|length >= 2 and parts[-1]['type'] != 'text' and texts|length == parts|length - 1 %}
        {%- set parts = [parts[-1]] + parts[:-1] %}
    {%- endif %}
    {{- render_parts(parts) }}
{%- endmacro %}
{%- macro tool_calls(calls) %}
    {%- for call in calls %}
        {%- set arguments = call['function']['arguments'] %}
        {{- '[TOOL_CALLS]' + call['function']['name'] + '[CALL_ID]' + call['id'] + '[ARGS]' }}
        {{- arguments if arguments is string else arguments|tojson }}
    {%- endfor %}
{%- endmacro %}
{{- bos_token }}
{%- for turn in ns.turns %}
    {%- if turn['role'] == 'system' %}
        {{- '[SYSTEM_PROMPT]' + render_parts(turn['parts']) + '[/SYSTEM_PROMPT]' }}
    {%- elif turn['role'] == 'user' %}
        {%- set ns.user = ns.user + 1 %}
        {%- if tools and ns.user == ns.last_user %}
            {{- '[AVAILABLE_TOOLS]' + tools|tojson + '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {{- '[INST]' + user_parts(turn['parts']) + '[/INST]' }}
    {%- elif turn['role'] == 'assistant' %}
        {{- render_parts(turn['parts']).rstrip(' ') + tool_calls(turn.get('tool_calls') or []) + eos_token }}
    {%- elif turn['role'] == 'tool' %}
        {{- '[TOOL_RESULTS]' + turn['tool_call_id'] + '[TOOL_CONTENT]' + turn['content'] + '[/TOOL_RESULTS]' }}
    {%- endif %}
{%- endfor %}
"""
V11_CALLS = CORRECT[CORRECT.index("{%- macro tool_calls"):CORRECT.index("{{- bos_token }}")]
V7_CALLS = r"""{%- macro tool_calls(calls) %}
    {%- if calls %}
        {{- '[TOOL_CALLS][' }}
        {%- for call in calls %}
            {%- set arguments = call['function']['arguments'] %}
            {{- '{"name": "' + call['function']['name'] + '", "arguments": ' }}
            {{- (arguments if arguments is string else arguments|tojson) + ', "id": "' + call['id'] + '"}' }}
            {{- ', ' if not loop.last }}
        {%- endfor %}
        {{- ']' }}
    {%- endif %}
{%- endmacro %}
"""


def variant(old: str, new: str) -> str:
    assert CORRECT.count(old) == 1, old
    return CORRECT.replace(old, new)


TOOL_CONVERSATIONS = ("tool_call_arguments_string", "tool_call_arguments_dict", "ends_at_tool_result")
CORRECT_V7 = variant(V11_CALLS, V7_CALLS)  # the Mistral Small 3.1 (v7) prompt
# name -> (template, {conversation that must differ: words its diagnosis must hold}); all others stay equal
BROKEN = {
    "injected_default_system_prompt": (variant("{{- bos_token }}", "{{- bos_token }}{%- if messages[0]['role'] != "
                                               "'system' %}[SYSTEM_PROMPT]You are a robot.[/SYSTEM_PROMPT]{% endif %}"),
                                       {"no_system": "default system prompt"}),
    "v7_tool_calls_on_v11": (CORRECT_V7, dict.fromkeys(TOOL_CONVERSATIONS, "v7-style tool calls")),
    "image_not_reordered": (variant("parts|length >= 2 and", "false and"), {"text_then_image": "image is misplaced"}),
    "consecutive_users_not_joined": (variant("and message['role'] == 'user' %}", "and false %}"),
                                     {"consecutive_users": "not joined"}),
    "html_escaped_json": (  # what Jinja's own tojson writes, which transformers replaces
        variant("tools|tojson", r"""tools|tojson|replace('<', '\\u003c')|replace('>', '\\u003e')"""
                                r"""|replace('&', '\\u0026')|replace("'", '\\u0027')"""),
        dict.fromkeys(TOOL_CONVERSATIONS, "HTML-escaped")),
    "html_escaped_by_e": (variant("tools|tojson", "tools|tojson|e"),
                          dict.fromkeys(TOOL_CONVERSATIONS, "HTML-escaped")),
    "ascii_escaped_json": (variant("tools|tojson", "tools|tojson(ensure_ascii=True)"),
                           dict.fromkeys(TOOL_CONVERSATIONS, "\\uXXXX")),
    "double_encoded_arguments": (variant("arguments if arguments is string else arguments|tojson", "arguments|tojson"),
                                 {"tool_call_arguments_string": "double-encoded"}),
    "v13_calls_on_v11": (variant("'[CALL_ID]' + call['id'] + ", ""),
                         dict.fromkeys(TOOL_CONVERSATIONS, "without [CALL_ID]")),
    "system_text_part_dropped": (variant("render_parts(turn['parts']) + '[/SYSTEM_PROMPT]'",
                                         "render_parts(turn['parts'][:1]) + '[/SYSTEM_PROMPT]'"),
                                 {"system_text_parts": "cut short"}),
    "reasoning_dropped": (variant("render_parts(turn['parts']).rstrip(' ')",
                                  "render_parts(turn['parts']).split('</think>')[-1].lstrip().rstrip(' ')"),
                          {"reasoning_earlier_turn": "reasoning"}),
    "tools_first": (variant("ns.user == ns.last_user", "ns.user == 0"),
                    dict.fromkeys(("tool_call_arguments_string", "tool_call_arguments_dict"), "[AVAILABLE_TOOLS]")),
    "refuses_consecutive_users": (variant("{{- bos_token }}", "{%- for m in messages %}{% if loop.index0 and m['role']"
                                          " == messages[loop.index0 - 1]['role'] == 'user' %}{{ raise_exception('roles"
                                          " must alternate') }}{% endif %}{% endfor %}{{- bos_token }}"),
                                  {"consecutive_users": "refuses consecutive user messages"}),
}
OWN = {"correct_v11": CORRECT, "correct_v7": CORRECT_V7, **{name: t for name, (t, _) in BROKEN.items()}}


# ---------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tokenizers():
    return {version: shipped_tokenizer(version) for version in ("v7", "v11", "v13")}


@pytest.fixture(scope="session")
def hf_tokenizers(tmp_path_factory):
    """transformers' own tokenizer of an exact tekken.json (it parses control-token strings in text)."""
    return {version: convert_tekken_tokenizer(str(write_tekken(tmp_path_factory.mktemp(version), version)),
                                              chat_template="{{ bos_token }}")
            for version in ("v7", "v11")}


@pytest.fixture
def fixed_date(monkeypatch):
    """transformers' strftime_now reads datetime.now(): pin it to the checker's date."""
    class Fixed(datetime):
        @classmethod
        def now(cls, tz=None):
            return chat_template.FIXED_NOW

    monkeypatch.setattr(hf_chat, "datetime", Fixed)


def all_templates() -> dict[str, str]:
    real = {name: (SHARED / name).read_text(encoding="utf-8") for name in TARGETS} if SHARED.is_dir() else {}
    return {**OWN, **real}


def verdicts(results) -> dict[str, str]:
    return {r.name: "equal" if r.equal else f"error: {r.error}" if r.error else f"differs: {r.diagnosis}"
            for r in results}


# ---------------------------------------------------------------------------------------- our templates judged

@pytest.mark.parametrize("name,version", [("correct_v11", "v11"), ("correct_v7", "v7")])
def test_correct_template_passes(name, version, tokenizers):
    results = check_chat_template(OWN[name], tokenizers[version])
    assert [r.name for r in results] == list(suite()) and len(results) == 12
    assert all(r.equal and r.first_difference is None and r.error is None for r in results), verdicts(results)


@pytest.mark.parametrize("name", BROKEN)
def test_broken_template_is_caught(name, tokenizers):
    """Negative controls: each known bug makes exactly the conversations it concerns differ, diagnosed."""
    template, expected = BROKEN[name]
    results = {r.name: r for r in check_chat_template(template, tokenizers["v11"])}
    assert {n for n, r in results.items() if not r.equal} == set(expected), verdicts(results.values())
    for conversation, words in expected.items():
        r = results[conversation]
        assert words in (r.diagnosis or ""), (conversation, r.diagnosis, r.error)
        if r.error is None:
            assert r.first_difference > 0 and r.expected != r.got and r.before


def test_report_shows_the_difference(tokenizers):
    results = check_chat_template(BROKEN["image_not_reordered"][0], tokenizers["v11"])
    (r,) = [r for r in results if not r.equal]
    prefix = "<s>[SYSTEM_PROMPT]You are a helpful assistant.[/SYSTEM_PROMPT][INST]"
    assert (r.name, r.before, r.error) == ("text_then_image", prefix, None)
    assert r.expected == "[IMG]What is in this picture?[/INST]" and r.got == "What is in this picture?[IMG][/INST]"
    assert r.first_difference == len(encode_rendered(tokenizers["v11"], prefix))
    report = chat_template.format_report(results)
    assert "text_then_image" in report and "differs at token" in report and "11 equal, 1 differ, 0 fail" in report


def test_template_errors_are_results(tokenizers):
    results = check_chat_template("{{ raise_exception('no thanks') }}{# content #}", tokenizers["v11"])
    assert all(not r.equal and r.error == "TemplateError: no thanks" for r in results)
    broken = check_chat_template("{% for m in messages %}{{ m.content }", tokenizers["v11"])
    assert all(r.error.startswith("the template does not compile: line 1") for r in broken)


def test_wrong_tokenizer_version_is_a_difference(tokenizers):
    """The v11 template judged with the v7 tokenizer: its tool calls are in the wrong layout."""
    results = {r.name: r for r in check_chat_template(CORRECT, tokenizers["v7"])}
    assert "v11-style tool calls" in results["tool_call_arguments_dict"].diagnosis
    assert results["multi_turn"].equal


# ---------------------------------------------------------------------------------------- against transformers

@pytest.mark.parametrize("version", ["v7", "v11"])
def test_rendering_and_ids_match_transformers(version, tokenizers, hf_tokenizers, fixed_date):
    """Every template x conversation: our text is apply_chat_template's text, and our ids of it are
    transformers' ids (tokenize=True); where one side raises, so does the other."""
    ours, hf = tokenizers[version], hf_tokenizers[version]
    counts = {"pairs": 0, "rendered": 0, "failed": 0}
    for name, source in all_templates().items():
        template = compile_template(source)
        for conversation, (messages, tools) in suite().items():
            counts["pairs"] += 1
            shown = [{key: value for key, value in m.items() if key != "prefix"} for m in messages]
            continued = bool(messages[-1].get("prefix"))
            kwargs = dict(tools=tools, chat_template=source, add_generation_prompt=not continued,
                          continue_final_message=continued)
            try:
                theirs = hf.apply_chat_template(shown, tokenize=False, **kwargs)
            except Exception as e:
                with pytest.raises(type(e)) as mine:
                    render_conversation(source, template, ours, messages, tools)
                if isinstance(e, jinja2.TemplateError):  # the template's own message, word for word
                    assert str(mine.value) == str(e)
                counts["failed"] += 1
                continue
            text = render_conversation(source, template, ours, messages, tools)
            assert text == theirs, (name, conversation)
            ids = hf.apply_chat_template(shown, tokenize=True, return_dict=False, **kwargs)
            assert encode_rendered(ours, text) == ids, (name, conversation)
            counts["rendered"] += 1
    expected_pairs = 12 * (len(OWN) + (len(TARGETS) if SHARED.is_dir() else 0))
    assert counts["pairs"] == expected_pairs and counts["rendered"] >= 0.8 * expected_pairs, counts
    print(version, counts)


def test_plain_jinja_would_not_match_transformers(tokenizers, hf_tokenizers, fixed_date):
    """Negative control for the comparison above: Jinja's defaults (no trim_blocks / lstrip_blocks, its
    HTML-escaping tojson) render other text than apply_chat_template; plain encode() gives other ids."""
    source = "{% for m in messages %}\n  {{ m['content'] }}\n{% endfor %}{{ tools|tojson }}"
    messages, tools = suite()["tool_call_arguments_dict"]
    messages = messages[:2]
    theirs = hf_tokenizers["v11"].apply_chat_template(messages, tools=tools, chat_template=source, tokenize=False)
    ours = render_conversation(source, compile_template(source), tokenizers["v11"], messages, tools)
    plain = jinja2.Environment().from_string(source).render(messages=messages, tools=tools)
    assert ours == theirs and plain != theirs and "\\u0027" in plain
    text = render_conversation(CORRECT, compile_template(CORRECT), tokenizers["v11"], messages, tools)
    hf_ids = hf_tokenizers["v11"].encode(text, add_special_tokens=False)
    assert encode_rendered(tokenizers["v11"], text) == hf_ids != tokenizers["v11"].encode(text)


def test_strftime_now_is_pinned(tokenizers):
    results = check_chat_template("{{ bos_token }}{{ strftime_now('%Y-%m-%d') }}", tokenizers["v11"])
    assert results[0].got.startswith("2025-06-20")


def test_generation_block_renders_its_body(tokenizers, hf_tokenizers):
    source = CORRECT.replace("{{- render_parts(turn['parts']).rstrip(' ')",
                             "{% generation %}{{- render_parts(turn['parts']).rstrip(' ')")
    source = source.replace("+ eos_token }}", "+ eos_token }}{% endgeneration %}")
    assert source.count("generation %}") == 2
    assert all(r.equal for r in check_chat_template(source, tokenizers["v11"]))
    messages, _ = suite()["multi_turn"]
    theirs = hf_tokenizers["v11"].apply_chat_template(messages, chat_template=source, tokenize=False)
    assert render_conversation(source, compile_template(source), tokenizers["v11"], messages, None) == theirs


# ---------------------------------------------------------------------------------------- tokenizing

def test_control_tokens_only_in_template_output(tokenizers):
    ours = tokenizers["v11"]
    text = "<s>[INST]Hi [IMG][/INST]ok</s>"
    assert encode_rendered(ours, text) == [1, 3, *ours.encode("Hi "), 10, 4, *ours.encode("ok"), 2]
    assert not any(ours.is_special(i) for i in ours.encode(text))  # tokenizer.py never parses them


def test_collapse_images(tokenizers):
    ours = tokenizers["v11"]
    img, brk, end = 10, 12, 13
    assert collapse_images(ours, [1, img, img, brk, img, img, end, 5, img, end, img, img]) == [1, img, 5, img, img, img]
    assert collapse_images(ours, [img, brk]) == [img, brk]


def test_shipped_tokenizer_is_the_test_tekken(tokenizers, tmp_path):
    """The checker's v11 tokenizer equals the one the other tests build from the same vocabulary."""
    reference = Tokenizer.from_file(write_tekken(tmp_path, "v11"))
    ours = tokenizers["v11"]
    names = [(ours.special_name(i), reference.special_name(i)) for i in range(1000)]
    assert all(a == b for a, b in names) and ours.image == reference.image and ours.n_words == reference.n_words
    text = "Привет 👋 [INST] {\"a\": 1}"
    assert ours.encode(text) == reference.encode(text)


# ---------------------------------------------------------------------------------------- reading templates

def write_gguf(path: Path, template: str | None, endianess=gguf.GGUFEndian.LITTLE, tensor: bool = False) -> Path:
    writer = gguf.GGUFWriter(path, "llama", endianess=endianess)
    if template is not None:
        writer.add_string("tokenizer.chat_template", template)
    writer.add_uint32("llama.block_count", 40)
    writer.add_float32("llama.rope.freq_base", 1e9)
    writer.add_float64("x.f64", 0.1)
    writer.add_int8("x.i8", -3)
    writer.add_uint64("x.u64", 2 ** 40)
    writer.add_int64("x.i64", -(2 ** 40))
    writer.add_bool("x.bool", True)
    writer.add_array("tokenizer.ggml.tokens", ["<unk>", "<s>", "Zürich", "東京"])
    writer.add_array("tokenizer.ggml.token_type", [2, 3, 1, 1])
    writer.add_array("x.floats", [0.5, -1.25])
    if tensor:
        writer.add_tensor("token_embd.weight", np.arange(8, dtype=np.float32).reshape(2, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_gguf_metadata_matches_gguf_reader(endianess, tmp_path):
    path = write_gguf(tmp_path / "model.gguf", CORRECT, endianess, tensor=True)
    ours = read_header(path).metadata
    reader = gguf.GGUFReader(path)
    theirs = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert ours == theirs and ours["tokenizer.chat_template"] == CORRECT and len(ours) == 12


def test_gguf_template_judged_like_the_jinja_file(tmp_path, tokenizers):
    jinja = tmp_path / "chat_template.jinja"
    jinja.write_text(BROKEN["double_encoded_arguments"][0], encoding="utf-8")
    path = write_gguf(tmp_path / "model.gguf", jinja.read_text(encoding="utf-8"))
    from_gguf = check_chat_template(read_template(path), tokenizers["v11"])
    assert from_gguf == check_chat_template(read_template(jinja), tokenizers["v11"])
    assert sum(not r.equal for r in from_gguf) == 1


def test_json_templates(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"bos_token": "<s>", "chat_template": CORRECT}), encoding="utf-8")
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"},
                                                   {"name": "default", "template": CORRECT}]}), encoding="utf-8")
    processor = tmp_path / "chat_template.json"
    processor.write_text(json.dumps({"chat_template": CORRECT_V7}), encoding="utf-8")
    assert read_template(config) == read_template(named) == CORRECT and read_template(processor) == CORRECT_V7


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words the one-line error must hold)"""
    def write(name: str, data) -> Path:
        path = tmp_path / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        return path

    good = write_gguf(tmp_path / "good.gguf", CORRECT).read_bytes()
    return {
        "missing": (tmp_path / "nothing.jinja", "not found"),
        "json_without_key": (write("tokenizer_config.json", '{"bos_token": "<s>"}'), "chat_template"),
        "invalid_json": (write("broken.json", '{"chat_template": '), "not valid JSON"),
        "empty": (write("empty.jinja", " \n"), "empty"),
        "not_utf8": (write("latin1.jinja", b"\xff\xfe{{ x }}"), "UTF-8"),
        "truncated_gguf": (write("truncated.gguf", good[:len(good) // 2]), "truncated"),
        "gguf_huge_length": (write("huge.gguf", good[:24] + (2 ** 62).to_bytes(8, "little") + good[32:]), "truncated"),
        "gguf_bad_version": (write("v9.gguf", b"GGUF" + (9).to_bytes(4, "little") + good[8:]), "version 9"),
        "gguf_bad_magic": (write("text.gguf", "{{ bos_token }}"), "not a GGUF file"),
        "gguf_without_template": (write_gguf(tmp_path / "no_template.gguf", None), "tokenizer.chat_template"),
    }


def test_bad_input_is_one_clear_error(tmp_path):
    for name, (path, words) in bad_inputs(tmp_path).items():
        with pytest.raises(InputError) as error:
            read_template(path)
        assert str(path) in str(error.value) and words in str(error.value), (name, str(error.value))


def test_bad_tokenizer_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="tokenizer not found: v12"):
        chat_template.load_tokenizer("v12")
    bad = tmp_path / "tekken.json"
    bad.write_text('{"config": {}}', encoding="utf-8")
    with pytest.raises(InputError, match=str(bad)):
        chat_template.load_tokenizer(tmp_path)  # a folder holding tekken.json
    old = write_tekken(tmp_path, "v3", name="old.json")
    with pytest.raises(InputError, match="v3 has no chat layout"):
        chat_template.load_tokenizer(old)


# ---------------------------------------------------------------------------------------- the command line

def test_command_line_exit_codes(tmp_path, capsys, tokenizers):
    good, bad = tmp_path / "good.jinja", tmp_path / "bad.jinja"
    good.write_text(CORRECT, encoding="utf-8")
    bad.write_text(BROKEN["v7_tool_calls_on_v11"][0], encoding="utf-8")
    tekken = write_tekken(tmp_path, "v11")
    assert chat_template.main([str(good), "--tokenizer", str(tekken)]) == 0
    assert chat_template.main([str(bad), "--tokenizer", "v11"]) == 1
    assert "v7-style tool calls" in capsys.readouterr().out
    assert chat_template.main([str(bad), "--tokenizer", "v7"]) == 0
    for path, _ in bad_inputs(tmp_path).values():
        assert chat_template.main([str(path), "--tokenizer", "v11"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and str(path) in err
    missing = tmp_path / "none.json"
    assert chat_template.main([str(good), "--tokenizer", str(missing)]) == 2
    assert capsys.readouterr().err == (f"error: tokenizer not found: {missing} "
                                       "(give a tekken.json or one of v7, v11, v13)\n")


def test_command_line_runs_as_a_script(tmp_path):
    """A missing file from the real command line: exit 2 and one line, no traceback."""
    missing = tmp_path / "missing.gguf"
    run = subprocess.run([sys.executable, "chat_template.py", str(missing), "--tokenizer", "v11"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode == 2 and run.stderr == f"error: template file not found: {missing}\n" and not run.stdout


# ---------------------------------------------------------------------------------------- the real templates

# What the checker reports for each template in ../shared/chat_templates with the tokenizer it targets:
# the conversations that are not equal, each with words of its diagnosis or error (the table in docs/runtime-authors.md).
REAL_VERDICTS = {
    "llamacpp-Mistral-Small-3.2-24B-Instruct-2506.jinja": {
        "no_system": "default system prompt", "system_text_parts": "cut short",
        "tool_call_arguments_string": "double-encoded", "text_then_image": "image is misplaced",
        "consecutive_users": "refuses consecutive user messages"},
    "llamacpp-mistralai-Mistral-Small-3.1-24B-Instruct-2503.jinja": {
        "no_system": "default system prompt", "system_text_parts": "cut short",
        **dict.fromkeys(TOOL_CONVERSATIONS, "added to the system prompt"),
        "text_then_image": "image is misplaced", "consecutive_users": "not joined"},
    "llamacpp-unsloth-mistral-Devstral-Small-2507.jinja": {
        "no_system": "default system prompt", "system_text_parts": "cut short",
        **dict.fromkeys(TOOL_CONVERSATIONS, "needs content"),
        "text_then_image": "image is misplaced", "consecutive_users": "not joined"},
    "mistral-common-generated-v11.jinja": {},
    "mistral-common-generated-v7.jinja": {},
    "mistral-common-tests-v11_image.jinja": {},
    "mistral-common-tests-v11_image_think.jinja": {},
    "mistral-common-tests-v11_think.jinja": dict.fromkeys(("image_then_text", "text_then_image"),
                                                          "Only text chunks are supported"),
    "mistral-common-tests-v7_image.jinja": dict.fromkeys(("tool_call_arguments_dict", "ends_at_tool_result"),
                                                         "HTML-escaped"),
    "transformers-test-Mistral-Small-3.1-2503-processor.jinja": {
        "no_system": "default system prompt", "system_text_parts": "cut short",
        **{name: "string content as a list of parts" for name in (
            "system_prompt", "multi_turn", "tool_call_arguments_string", "tool_call_arguments_dict",
            "ends_at_tool_result", "image_then_text", "text_then_image", "consecutive_users", "assistant_prefix",
            "reasoning_earlier_turn")}},
    "vllm-examples-tool_chat_template_mistral3.jinja": {
        "no_system": "default system prompt", "system_text_parts": "cut short",
        **dict.fromkeys(TOOL_CONVERSATIONS, "added to the system prompt"),
        "text_then_image": "image is misplaced", "consecutive_users": "not joined"},
}


@needs_shared
@pytest.mark.parametrize("name", TARGETS)
def test_real_template_verdicts(name, tokenizers):
    results = {r.name: r for r in check_chat_template((SHARED / name).read_text(encoding="utf-8"),
                                                      tokenizers[TARGETS[name]])}
    expected = REAL_VERDICTS[name]
    assert {n for n, r in results.items() if not r.equal} == set(expected), verdicts(results.values())
    for conversation, words in expected.items():
        r = results[conversation]
        assert words in f"{r.diagnosis} {r.error}", (conversation, r.diagnosis, r.error)
