"""serve.py against the real openai client, bad input, disconnects, load; compare-server (compare_server.py).

Every server listens on 127.0.0.1 on a free port, runs in a thread of this process (or, for the load
test, in a subprocess), and is shut down at the end; every loop and wait is bounded."""
import base64
import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path

import openai
import pytest
import torch
from openai import OpenAI
from safetensors.torch import load_file, save_file

import batch
import compare_server
import generate
import serve
from chat import encode_chat
from checkpoints import TINY_VISION_PARAMS
from compare_server import TokenIds, compare_position
from inputs import InputError
from load import load_model
from model_folders import write_model_folder
from serve import Limits

ROOT = Path(__file__).parents[1]
PARAMS = {**TINY_VISION_PARAMS, "vocab_size": 131072, "max_position_embeddings": 300}
MODEL_ID = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
SYSTEM = "You are {name}, a helpful assistant. Today is {today}, yesterday was {yesterday}."
MAX_BODY = 256 * 1024
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ARGUMENTS = '{"city": "Paris"}'


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A model folder laid out like the official repository, with a tiny random model; a folder that
    local images may be read from (--allow-local-images) holding one image and a link out of it."""
    folder = tmp_path_factory.mktemp("Mistral-Small-3.2-24B-Instruct-2506")
    write_model_folder(folder, PARAMS, SYSTEM)
    allowed = folder / "allowed"
    allowed.mkdir()
    shutil.copy(folder / "photo.png", allowed / "inside.png")
    (allowed / "link.png").symlink_to(folder / "photo.png")
    return folder


@pytest.fixture(scope="module")
def session(repo):
    session = generate.Session(str(repo), device="cpu", dtype="float32")
    session.load()
    return session


@contextmanager
def serving(session, limits: Limits | None = None, **options):
    """A server on a free port, in a thread; its base URL (http://127.0.0.1:PORT). options: Server's."""
    server = serve.Server(session, MODEL_ID, limits, port=0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    assert server.ready.wait(timeout=60), "the model did not load"
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def url(session, repo):
    with serving(session, Limits(max_body=MAX_BODY, max_images=2, local_images=repo / "allowed")) as base:
        yield base


@pytest.fixture
def client(url):
    with OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=60) as client:
        yield client


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def raw(url: str, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one request over a connection of its own."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def exchange(url: str, method: str, path: str, headers: dict) -> tuple[int, dict, bytes]:
    """(status, response headers, body) of one request without a body, with `headers`."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def hello(client, text: str = "Hello", **kw):
    return client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": text}],
                                          temperature=kw.pop("temperature", 0), max_tokens=kw.pop("max_tokens", 6), **kw)


def tool_call_ids(session) -> list[int]:
    """What the model generates to call get_weather(city="Paris") (v11 layout)."""
    tok = session.tokenizer
    return [tok.special_id("[TOOL_CALLS]"), *tok.encode("get_weather"), tok.special_id("[ARGS]"),
            *tok.encode(ARGUMENTS), tok.eos_id]


@pytest.fixture
def script(monkeypatch):
    """script(ids): the next tokens sampled are `ids` (random weights never call a tool), then the
    model's own again."""
    def set_script(ids: list[int]):
        real, queued = batch.sample, iter(ids)

        def sample(logits, s, generator=None):
            token = next(queued, None)
            return real(logits, s, generator) if token is None else torch.tensor([token])
        monkeypatch.setattr(batch, "sample", sample)
    return set_script


# ----------------------------------------------------------------------------- the openai client

def test_models_and_health(client, url):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID] and models.data[0].object == "model"
    assert models.data[0].owned_by and models.data[0].created > 0
    assert raw(url, "GET", "/health") == (200, {"status": "ok"})


def test_card_vision_snippet(client, repo, session):
    """The model card's vision example as it is, but for the image: a data: URL (no network here)."""
    TEMP = 0.15
    MAX_TOK = 131072
    model = client.models.list().data[0].id

    def load_system_prompt(repo_id: str, filename: str) -> str:
        system_prompt = (repo / filename).read_text()      # the card: hf_hub_download(repo_id, filename)
        today = date.today().strftime("%Y-%m-%d")
        yesterday = (date.today() - timedelta(days=1)).strftime("%Y-%m-%d")
        model_name = repo_id.split("/")[-1]
        return system_prompt.format(name=model_name, today=today, yesterday=yesterday)

    SYSTEM_PROMPT = load_system_prompt(model, "SYSTEM_PROMPT.txt")
    image_url = data_url(repo / "photo.png")
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [
            {"type": "text", "text": "What action do you think I should take in this situation? List all the "
                                     "possible actions and explain why you think they are good or bad."},
            {"type": "image_url", "image_url": {"url": image_url}},
        ]},
    ]
    response = client.chat.completions.create(model=model, messages=messages, temperature=TEMP, max_tokens=MAX_TOK)
    print(response.choices[0].message.content[:80])

    prompt, _ = encode_chat(session.tokenizer, messages)
    usage = response.usage
    assert usage.prompt_tokens == len(prompt) and session.tokenizer.special_id("[IMG]") in prompt
    # 131072 is clamped to what the context leaves (random weights hardly ever sample </s>)
    room = PARAMS["max_position_embeddings"] - len(prompt)
    finish = response.choices[0].finish_reason
    assert (finish, usage.completion_tokens) == ("length", room) or finish == "stop" and usage.completion_tokens < room
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion" and response.model == model


def test_prompt_ids_and_greedy_answer_equal_the_cli(client, url, repo, session, tmp_path, capsys):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                             {"type": "image_url", "image_url": {"url": data_url(repo / "photo.png")}}]}]
    status, tokenized = raw(url, "POST", "/tokenize", {"messages": messages, "tools": TOOLS})
    ids, images = encode_chat(session.tokenizer, messages, TOOLS)
    assert status == 200 and tokenized["tokens"] == ids and tokenized["count"] == len(ids)
    assert tokenized["images"] == [[2, 3]] and tokenized["max_model_len"] == 300   # 45 x 70 pixels

    answer = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, temperature=0,
                                            max_tokens=12)
    (tmp_path / "m.json").write_text(json.dumps(messages))
    (tmp_path / "t.json").write_text(json.dumps(TOOLS))
    assert generate.main(["--model", str(repo), "--messages", str(tmp_path / "m.json"), "--tools",
                          str(tmp_path / "t.json"), "--temperature", "0", "--max-tokens", "12",
                          "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert answer.choices[0].message.content + "\n" == printed and len(printed) > 10
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 12


def test_function_calling_round_trip(client, url, session, script):
    """The card's function-calling flow: tools, the call back, the call echoed, its result, the answer."""
    script(tool_call_ids(session))
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    response = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, temperature=0.15)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert re.fullmatch(r"[a-zA-Z0-9]{9}", call.id) and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    tool_calls = choice.message.tool_calls
    messages.append({"role": "assistant", "tool_calls": tool_calls})          # as the card does
    messages.append({"role": "tool", "tool_call_id": call.id, "name": call.function.name,
                     "content": '{"temperature": 21}'})
    final = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, temperature=0,
                                           max_tokens=5)
    assert final.choices[0].finish_reason == "length" and final.choices[0].message.tool_calls is None
    assert isinstance(final.choices[0].message.content, str)

    # the same turn echoed whole (content None, refusal, audio, ... extra keys), or with content ""
    expected, _ = encode_chat(session.tokenizer, json.loads(json.dumps(messages, default=lambda m: m.model_dump())),
                              TOOLS)
    for echoed in (choice.message.model_dump(), {**choice.message.model_dump(), "content": ""}):
        status, tokenized = raw(url, "POST", "/tokenize", {"messages": [messages[0], echoed, messages[2]],
                                                           "tools": TOOLS})
        assert status == 200 and tokenized["tokens"] == expected


def stream_answer(client, **kw) -> tuple[list, str, dict]:
    """(chunks, content joined, tool calls joined by index: {index: {id, name, arguments}})."""
    chunks = list(client.chat.completions.create(model=MODEL_ID, stream=True, **kw))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls: dict = {}
    for c in chunks:
        for delta in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["name"] = call["name"] or (delta.function.name if delta.function else None)
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    return chunks, content, calls


def test_streaming_text(client, url):
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=10)
    chunks, content, calls = stream_answer(client, messages=messages, temperature=0, max_tokens=10,
                                           stream_options={"include_usage": True})
    assert content == whole.choices[0].message.content and not calls
    first, last, usage = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert last.choices[0].finish_reason == "length" and all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert usage.choices == [] and usage.usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == \
        whole.usage.model_dump(include={"prompt_tokens", "completion_tokens"})
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1
    chunks, _, _ = stream_answer(client, messages=messages, temperature=0, max_tokens=3)   # no usage asked
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)

    # the wire: data: lines, [DONE] last
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": messages, "max_tokens": 3, "stream": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    events = [line for line in response.read().decode().split("\n\n") if line]
    conn.close()
    assert response.getheader("Content-Type") == "text/event-stream"
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_streaming_tool_calls(client, session, script):
    script(tool_call_ids(session))
    chunks, content, calls = stream_answer(client, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=TOOLS, temperature=0)
    assert content == "" and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["arguments"] == ARGUMENTS
    assert re.fullmatch(r"[a-zA-Z0-9]{9}", calls[0]["id"])
    first = next(c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls)
    assert first.id and first.type == "function" and first.function.name == "get_weather"


@torch.inference_mode()
def test_logprobs_are_the_raw_distribution(client, session, repo):
    """At temperature 1.3 the tokens are sampled from a flattened distribution; the logprobs are the
    model's own (before temperature), the same as a plain forward over prompt + answer gives."""
    messages = [{"role": "user", "content": "Hello"}]
    response = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=1.3, seed=1,
                                              max_tokens=6, logprobs=True, top_logprobs=5)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens == 6
    tok = session.tokenizer
    by_bytes = {tok.token_bytes(i): i for i in range(tok.n_words) if not tok.is_special(i)}
    generated = [by_bytes[bytes(e.bytes)] for e in entries]
    prompt, _ = encode_chat(tok, messages)
    model = load_model(repo)
    expected = model(torch.tensor([prompt + generated[:-1]]))[0, len(prompt) - 1:].log_softmax(-1)
    for entry, token, row in zip(entries, generated, expected):
        assert abs(entry.logprob - row[token].item()) < 1e-4
        assert len(entry.top_logprobs) == 5 and entry.top_logprobs[0].logprob == pytest.approx(row.max().item(), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == sorted([t.logprob for t in entry.top_logprobs], reverse=True)
        assert bytes(entry.bytes) == tok.token_bytes(token) and entry.token == tok.token_bytes(token).decode(errors="replace")
    assert hello(client).choices[0].logprobs is None
    streamed = [e for c in client.chat.completions.create(
        model=MODEL_ID, messages=messages, temperature=1.3, seed=1, max_tokens=6, logprobs=True, top_logprobs=5,
        stream=True) if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in entries]


def test_seed_stop_and_max_tokens(client):
    draw = lambda seed: client.chat.completions.create(   # noqa: E731
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], temperature=1.0, seed=seed,
        max_tokens=8).choices[0].message.content
    assert draw(5) == draw(5) and any(draw(5) != draw(seed) for seed in (6, 7, 8))

    text = hello(client, max_tokens=12).choices[0].message.content
    stop = text[len(text) // 3:len(text) // 3 + 3]
    cut = text[:text.index(stop)]
    stopped = hello(client, max_tokens=12, stop=[stop, "never appears"])
    assert stopped.choices[0].message.content == cut and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 12
    _, content, _ = stream_answer(client, messages=[{"role": "user", "content": "Hello"}], temperature=0,
                                  max_tokens=12, stop=stop)
    assert content == cut
    assert hello(client, max_tokens=3).usage.completion_tokens == 3


# ----------------------------------------------------------------------------- completions (the legacy API)

def token_text(tok, token: int) -> str:
    """A token as the logprobs name it: its text, or a control token's name."""
    return tok.special_name(token) if tok.is_special(token) else tok.token_bytes(token).decode(errors="replace")


@torch.inference_mode()
def test_completions_echo_and_logprobs_are_the_models_own(client, session, repo):
    """The real openai client's completions.create with echo and logprobs: the prompt's tokens (<s> first,
    without a logprob, as OpenAI's first token), then the answer's, each with the logprob and the top 3
    of the model run in-process; the text and the offsets of each token in it."""
    tok, prompt = session.tokenizer, "The capital of France is"
    response = client.completions.create(model=MODEL_ID, prompt=prompt, echo=True, logprobs=3, max_tokens=5,
                                         temperature=0)
    (choice,) = response.choices
    ids = tok.encode(prompt, bos=True)
    model = load_model(repo)
    answer, _ = generate.generate(model, ids, [], 5, generate.Sampling(temperature=0), {tok.eos_id})
    every = ids + answer
    expected = model(torch.tensor([every]))[0].log_softmax(-1)                     # [n, V]
    assert response.id.startswith("cmpl-") and response.object == "text_completion" and choice.index == 0
    assert choice.text == prompt + tok.decode(answer) and choice.finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), 5)
    lp = choice.logprobs
    assert lp.tokens == [token_text(tok, t) for t in every]
    assert lp.tokens[0] == "<s>" and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    worst = 0.0
    for i in range(1, len(every)):
        row, top = expected[i - 1], expected[i - 1].topk(3)
        worst = max(worst, abs(lp.token_logprobs[i] - row[every[i]].item()))
        assert set(lp.top_logprobs[i]) == {token_text(tok, t) for t in [every[i], *top.indices.tolist()]}
        assert max(lp.top_logprobs[i].values()) == pytest.approx(top.values[0].item(), abs=1e-4)
    print(f"\ncompletions with echo and logprobs: {len(every)} tokens, max |served - in-process| {worst:.1e}")
    assert worst < 1e-4
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[:2] == [0, 0]     # <s> has no text
    for token, offset, t in zip(lp.tokens, lp.text_offset, every):
        if not tok.is_special(t) and "\ufffd" not in token:                               # a whole character
            assert choice.text[offset:offset + len(token)] == token

    as_ids = client.completions.create(model=MODEL_ID, prompt=every, echo=True, logprobs=0, max_tokens=0,
                                       extra_body={"return_tokens_as_token_ids": True}).choices[0]
    assert as_ids.text == choice.text and as_ids.logprobs.tokens == [f"token_id:{t}" for t in every]
    assert as_ids.logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:len(every)], abs=1e-5)
    assert all(top is None or list(top) == [f"token_id:{t}"] for top, t in zip(as_ids.logprobs.top_logprobs, every))
    alone = client.completions.create(model=MODEL_ID, prompt=[tok.bos_id], echo=True, logprobs=2, max_tokens=0)
    assert alone.choices[0].logprobs.tokens == ["<s>"] and alone.choices[0].logprobs.token_logprobs == [None]


def test_completions_batch_stream_stop_and_seed(client, session):
    """A batch of prompts (ids and text) answers each as alone; a stream sends the same text and logprobs;
    stop strings cut the text; a seed gives the same sample."""
    tok = session.tokenizer
    prompts = [tok.encode("Once upon a time", bos=True), "In a galaxy far away"]
    complete = lambda prompt, **kw: client.completions.create(   # noqa: E731
        model=MODEL_ID, prompt=prompt, max_tokens=kw.pop("max_tokens", 6), temperature=kw.pop("temperature", 0), **kw)
    alone = [complete(p).choices[0].text for p in prompts]
    both = complete(prompts)
    assert [c.index for c in both.choices] == [0, 1] and [c.text for c in both.choices] == alone and all(alone)
    assert both.usage.prompt_tokens == len(prompts[0]) + len(tok.encode(prompts[1], bos=True))
    assert both.usage.completion_tokens == 12

    whole = complete(prompts[1], echo=True, logprobs=2).choices[0]
    chunks = list(complete(prompts[1], echo=True, logprobs=2, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.text for p in pieces) == whole.text and pieces[-1].finish_reason == "length"
    streamed = [p.logprobs for p in pieces if p.logprobs]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for lp in streamed for x in getattr(lp, field)] == getattr(whole.logprobs, field), field
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6

    stop = alone[1][2:5]
    stopped = complete(prompts[1], stop=[stop]).choices[0]
    assert stopped.text == alone[1][:alone[1].index(stop)] and stopped.finish_reason == "stop"
    draw = lambda seed: complete(prompts[1], temperature=1.0, seed=seed, max_tokens=8).choices[0].text  # noqa: E731
    assert draw(3) == draw(3) and any(draw(3) != draw(seed) for seed in (4, 5, 6))


def test_tokenize_a_text_and_detokenize(url, session):
    """vLLM's /tokenize of a text, /detokenize and /tokenizer_info: what lm-eval's remote tokenizer asks."""
    tok = session.tokenizer
    status, body = raw(url, "POST", "/tokenize", {"prompt": "Hello world"})
    assert status == 200 and body["tokens"] == tok.encode("Hello world", bos=True) and body["max_model_len"] == 300
    status, body = raw(url, "POST", "/tokenize", {"prompt": "[INST] </s>", "add_special_tokens": False})
    assert body["tokens"] == tok.encode("[INST] </s>") and tok.eos_id not in body["tokens"]   # text, not control
    assert raw(url, "POST", "/detokenize", {"tokens": tok.encode("Hello world", bos=True)}) == (200, {"prompt": "Hello world"})
    status, info = raw(url, "GET", "/tokenizer_info")
    assert status == 200 and (info["bos_token"], info["eos_token"], info["model_max_length"]) == ("<s>", "</s>", 300)


# ----------------------------------------------------------------------------- bad input

def bad_inputs(repo) -> list:
    user = lambda content: {"messages": [{"role": "user", "content": content}]}   # noqa: E731
    image = lambda url: user([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}])  # noqa: E731
    return [
        ("malformed JSON", "POST", "/v1/chat/completions", b'{"messages": [', 400, "not valid JSON"),
        ("a body that is not an object", "POST", "/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object"),
        ("no messages", "POST", "/v1/chat/completions", {"model": MODEL_ID}, 400, "messages must be a non-empty list"),
        ("unknown role", "POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
         "unknown role 'wizard'"),
        ("bad image", "POST", "/v1/chat/completions", image("data:image/png;base64,AAAA"), 400,
         "cannot read image"),
        ("local image, outside the allowed folder", "POST", "/v1/chat/completions", image(str(repo / "photo.png")),
         400, "outside the folder"),
        ("file:// link out of the allowed folder", "POST", "/v1/chat/completions",
         image((repo / "allowed" / "link.png").as_uri()), 400, "outside the folder"),
        ("../ out of the allowed folder", "POST", "/v1/chat/completions", image("../photo.png"), 400,
         "outside the folder"),
        ("too many images", "POST", "/v1/chat/completions", user(
            [{"type": "image_url", "image_url": {"url": data_url(repo / "photo.png")}}] * 3), 400,
         "3 images, more than the 2"),
        ("prompt over the context", "POST", "/v1/chat/completions", user("word " * 400), 400,
         "more than the model's context of 300 tokens"),
        ("tool call without a function", "POST", "/v1/chat/completions", {"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"id": "abcDEF123"}]},
            {"role": "user", "content": "and?"}]}, 400, "a tool call is"),
        ("negative temperature", "POST", "/v1/chat/completions", {**user("hi"), "temperature": -1}, 400,
         "temperature must be a finite number >= 0"),
        ("max_tokens 0", "POST", "/v1/chat/completions", {**user("hi"), "max_tokens": 0}, 400,
         "max_tokens must be an integer >= 1"),
        ("top_logprobs 21", "POST", "/v1/chat/completions", {**user("hi"), "logprobs": True, "top_logprobs": 21},
         400, "top_logprobs must be an integer from 0 to 20"),
        ("n = 2", "POST", "/v1/chat/completions", {**user("hi"), "n": 2}, 400, "n must be 1"),
        ("empty stop string", "POST", "/v1/chat/completions", {**user("hi"), "stop": [""]}, 400,
         "stop must be a string or a list of non-empty strings"),
        ("unknown route", "GET", "/v1/nothing", None, 404, "unknown route: GET /v1/nothing"),
        ("completion without a prompt", "POST", "/v1/completions", {"model": MODEL_ID}, 400,
         "prompt must be a text, a non-empty list of token ids, or a non-empty list of either"),
        ("completion, an empty prompt list", "POST", "/v1/completions", {"prompt": []}, 400, "prompt must be a text"),
        ("completion, ids and a number in one list", "POST", "/v1/completions", {"prompt": [[1, 2], 3]}, 400,
         "prompt must be a text"),
        ("completion, a token id out of range", "POST", "/v1/completions", {"prompt": [1, 200000]}, 400,
         "token id 200000 is out of range"),
        ("completion, max_tokens 0 without echo", "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400,
         "max_tokens 0 needs echo: true"),
        ("completion, logprobs 21", "POST", "/v1/completions", {"prompt": "hi", "logprobs": 21}, 400,
         "logprobs must be an integer from 0 to 20"),
        ("completion, logprobs true", "POST", "/v1/completions", {"prompt": "hi", "logprobs": True}, 400,
         "logprobs must be an integer from 0 to 20"),
        ("completion, prompt over the context", "POST", "/v1/completions", {"prompt": "word " * 400}, 400,
         "a sequence may take 300 positions here"),
        ("completion, n = 2", "POST", "/v1/completions", {"prompt": "hi", "n": 2}, 400, "n must be 1"),
        ("detokenize a text", "POST", "/detokenize", {"tokens": "abc"}, 400, "tokens must be a list of token ids"),
        ("detokenize an id out of range", "POST", "/detokenize", {"tokens": [200000]}, 400,
         "token id 200000 is out of range"),
        ("POST to an unknown route", "POST", "/v1/embeddings", {"input": "hi"}, 404, "unknown route"),
        ("body over the limit", "POST", "/v1/chat/completions", user("x" * MAX_BODY), 413,
         f"over this server's limit of {MAX_BODY} bytes"),
        ("JSON nested without end", "POST", "/v1/chat/completions", b"[" * 5000, 400, "nested deeper than 64"),
        ("seed past 2^64 - 1", "POST", "/v1/chat/completions", {**user("hi"), "seed": 2**70}, 400,
         "seed must be an integer from 0 to"),
        ("a NUL byte in an image path", "POST", "/v1/chat/completions", image("a\0b.png"), 400, "a NUL byte"),
    ]


def test_bad_input_gets_its_status_and_the_server_keeps_serving(client, url, repo):
    table = []
    for what, method, path, body, status, message in bad_inputs(repo):
        got, reply = raw(url, method, path, body)
        table.append(f"{what:40} {got}  {reply['error']['message'][:110]}")
        assert got == status, (what, reply)
        assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}, what
        assert message in reply["error"]["message"], (what, reply)
        assert reply["error"]["type"] == "invalid_request_error"
        assert hello(client, max_tokens=1).choices[0].finish_reason == "length", what   # still serving
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:    # a body without a length
        sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        received = b"".join(iter(lambda: sock.recv(65536), b""))    # the server closes the connection
        head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411") and b"needs a Content-Length" in body
    table.append(f"{'a chunked body (no Content-Length)':40} 411  {json.loads(body)['error']['message']}")
    with socket.create_connection((host, int(port)), timeout=30) as sock:    # a length that is no number
        sock.sendall("POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: \u00b2\r\n\r\n{}".encode())
        head, _, body = b"".join(iter(lambda: sock.recv(65536), b"")).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411") and b"needs a Content-Length" in body
    table.append(f"{'Content-Length: ²':40} 411  {json.loads(body)['error']['message']}")
    print("\n" + "\n".join(table))
    with pytest.raises(openai.BadRequestError) as refused:       # as the openai client reports it
        hello(client, temperature=-1)
    assert refused.value.status_code == 400 and refused.value.body["param"] == "temperature"
    inside = client.chat.completions.create(model=MODEL_ID, max_tokens=1, messages=[{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "inside.png"}}]}])
    assert inside.usage.prompt_tokens > 10                        # an image inside the allowed folder is read


def test_local_images_are_refused_unless_allowed(tmp_path):
    assert serve.image_source("data:image/png;base64,AAAA", None).startswith("data:")
    assert serve.image_source("https://example.com/a.png", None) == "https://example.com/a.png"
    for source in ("/etc/passwd", "file:///etc/passwd", "photo.png"):
        with pytest.raises(serve.HTTPError, match="reads no local image files"):
            serve.image_source(source, None)
    with pytest.raises(serve.HTTPError, match="only local file:// URLs"):
        serve.image_source("file://other-host/x.png", tmp_path)


def test_api_key_and_cors(repo, url):
    """--api-key: every route but /health needs it (the openai client sends it); --allow-origin: the
    pages of that origin may call (a preflight, then the origin in the answers), others may not; without
    it no answer names an origin and a preflight is an unknown route."""
    session = generate.Session(str(repo), device="cpu", dtype="float32")     # a server's model is its own
    origin = "https://app.example"
    with serving(session, api_key="sk-secret", allow_origins=(origin,)) as guarded:
        assert raw(guarded, "GET", "/health") == (200, {"status": "ok"})
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-secret"}):
            status, _, body = exchange(guarded, "GET", "/v1/models", headers)
            assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key", headers
        with OpenAI(base_url=f"{guarded}/v1", api_key="sk-secret", max_retries=0) as good, \
                OpenAI(base_url=f"{guarded}/v1", api_key="wrong", max_retries=0) as bad:
            assert hello(good, max_tokens=2).usage.completion_tokens == 2
            assert good.completions.create(model=MODEL_ID, prompt="hi", max_tokens=2).usage.completion_tokens == 2
            with pytest.raises(openai.AuthenticationError):
                hello(bad, max_tokens=2)
        preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        status, headers, _ = exchange(guarded, "OPTIONS", "/v1/chat/completions", preflight)
        assert status == 204 and headers["Access-Control-Allow-Origin"] == origin
        assert "POST" in headers["Access-Control-Allow-Methods"]
        assert "Authorization" in headers["Access-Control-Allow-Headers"]
        status, headers, _ = exchange(guarded, "OPTIONS", "/v1/chat/completions", {**preflight, "Origin": "https://evil.example"})
        assert status == 403 and "Access-Control-Allow-Origin" not in headers
        status, headers, _ = exchange(guarded, "GET", "/v1/models", {"Origin": origin, "Authorization": "Bearer sk-secret"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == origin and headers["Vary"] == "Origin"
        status, headers, _ = exchange(guarded, "GET", "/v1/models", {"Origin": "https://evil.example",
                                                                     "Authorization": "Bearer sk-secret"})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = exchange(url, "GET", "/v1/models", {"Origin": origin})            # the default server
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = exchange(url, "OPTIONS", "/v1/models", preflight)
    assert status == 404 and "Access-Control-Allow-Origin" not in headers


@pytest.mark.parametrize("flags, message", [
    (["--max-batch", "0"], "--max-batch 0: expected 1 or more"),
    (["--max-model-len", "1"], "--max-model-len 1: expected 2 or more"),
    (["--api-key", ""], "--api-key: expected a non-empty key"),
])
def test_serving_flags_are_checked_before_loading(flags, message, capsys):
    with pytest.raises(SystemExit) as exit:
        serve.main(["--model", "/nonexistent", *flags])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_max_model_len_over_the_context_is_refused(repo, capsys):
    assert serve.main(["--model", str(repo), "--device", "cpu", "--max-model-len", "301"]) == 2
    assert "--max-model-len 301: more than the model's context of 300 tokens" in capsys.readouterr().err


def test_a_bug_is_a_500_with_its_traceback_on_stderr(client, monkeypatch, capfd):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug deep inside")
    monkeypatch.setattr(batch, "prefill", broken)
    with pytest.raises(openai.InternalServerError, match="internal error: RuntimeError: a bug deep inside"):
        hello(client)
    monkeypatch.undo()
    assert "Traceback" in capfd.readouterr().err
    assert hello(client).choices[0].message.content


def test_an_error_mid_stream_is_an_error_chunk(client, monkeypatch, capfd):
    real, calls = batch.sample, []

    def failing(logits, s, generator=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("sampling broke")
        return real(logits, s, generator)
    monkeypatch.setattr(batch, "sample", failing)
    seen = []
    with pytest.raises(openai.APIError, match="sampling broke"):
        for chunk in client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                                    temperature=0, max_tokens=10, stream=True):
            seen.append(chunk)
    assert len(seen) >= 2      # the role delta and the first tokens came before the error
    monkeypatch.undo()
    assert "Traceback" in capfd.readouterr().err and hello(client).choices[0].message.content


def test_a_client_that_leaves_mid_stream_stops_its_generation(client, url, monkeypatch):
    counts, real = [], batch.sample

    def counting(logits, s, generator=None):   # the engine's tokens for the abandoned answer (500 asked)
        counts.append(s.max_tokens == 500)
        return real(logits, s, generator)
    monkeypatch.setattr(batch, "sample", counting)
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 500,
                       "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        received = b""
        for _ in range(100):                                    # until two data chunks have come
            received += sock.recv(4096)
            if received.count(b"data: ") >= 2:
                break
    start = time.perf_counter()
    assert hello(client, max_tokens=4).usage.completion_tokens == 4
    seconds = time.perf_counter() - start
    for _ in range(50):                                          # until the engine has made its last token
        made = len(counts)
        time.sleep(0.2)
        if len(counts) == made:
            break
    print(f"the abandoned stream generated {sum(counts)} of 500 tokens; the next answer came in {seconds:.2f} s")
    assert sum(counts) < 100 and seconds < 10


# ----------------------------------------------------------------------------- starting, logging, fields not implemented

def test_a_port_in_use_fails_before_the_model_loads(repo, monkeypatch, capsys):
    monkeypatch.setattr(generate.Session, "load", lambda self: pytest.fail("the model loaded before the port"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        start = time.perf_counter()
        assert serve.main(["--model", str(repo), "--device", "cpu", "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err and time.perf_counter() - start < 10


def test_health_says_loading_until_the_model_is_ready(repo, monkeypatch):
    """The server listens first; while the model loads (on a thread) /health answers 503 {"status":
    "loading"} and every other route 503; then 200 and answers."""
    loaded, release, real = threading.Event(), threading.Event(), generate.Session.load

    def slow_load(self):
        assert release.wait(timeout=60)
        loaded.set()
        return real(self)
    monkeypatch.setattr(generate.Session, "load", slow_load)
    server = serve.Server(generate.Session(str(repo), device="cpu", dtype="float32"), MODEL_ID, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert raw(url, "GET", "/health") == (503, {"status": "loading"})
        status, body = raw(url, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 503 and "loading" in body["error"]["message"]
        assert raw(url, "GET", "/v1/models")[0] == 503 and not loaded.is_set()
        release.set()
        assert server.ready.wait(timeout=60)
        assert raw(url, "GET", "/health") == (200, {"status": "ok"})
        status, body = raw(url, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                                 "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] == 2
    finally:
        release.set()
        server.close()
        thread.join(timeout=10)


def test_a_model_that_fails_to_load_stops_the_server(repo, monkeypatch, capsys):
    def bad(self):
        raise InputError("layers.0.attention.wq.weight holds nan")
    monkeypatch.setattr(generate.Session, "load", bad)
    assert serve.main(["--model", str(repo), "--device", "cpu", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "listening on http://127.0.0.1:" in err and "error: layers.0.attention.wq.weight holds nan" in err


def test_one_log_line_per_request(client, capfd):
    """Its id, tokens, time to first token, speed, finish reason and client, on one line; a warning when
    it names another model. Not http.server's access line besides."""
    capfd.readouterr()
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}],
                                           temperature=0, max_tokens=3)
    chunks, _, _ = stream_answer(client, messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=3)
    time.sleep(0.2)                                     # the stream's line is written once it is sent
    err = capfd.readouterr().err
    print(err)
    (line,) = [line for line in err.splitlines() if reply.id in line]
    assert line.startswith("127.0.0.1 ") and "POST /v1/chat/completions 200" in line
    assert f"{reply.usage.prompt_tokens} prompt tokens, 3 generated, first token " in line
    assert re.search(r"decode \S+ (tok/s|s/token), finish length$", line), line
    (streamed,) = [line for line in err.splitlines() if chunks[0].id in line]
    assert "3 generated" in streamed and "finish length" in streamed
    assert re.search(r"warning: the request names model 'gpt-4o-mini'; this server serves", err)
    assert err.count("warning:") == 1                   # the streamed request named the served model
    assert "HTTP/1.1\"" not in err                      # no access line besides


@pytest.mark.parametrize("field, value", [
    ("response_format", {"type": "json_object"}), ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "get_weather"}}), ("logit_bias", {"1000": 5}),
    ("presence_penalty", 0.5), ("frequency_penalty", 1), ("parallel_tool_calls", False), ("min_p", 0.1),
    ("repetition_penalty", 1.1), ("guided_json", {"type": "object"}), ("reasoning_effort", "high"),
])
def test_fields_not_implemented_are_refused(url, field, value):
    status, body = raw(url, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 1, field: value})
    assert status == 400 and body["error"]["param"] == field and body["error"]["message"].startswith(field), body


def test_fields_that_ask_for_nothing_are_accepted(client):
    """What clients send by default (mistral-common's to_openai: response_format text, tool_choice auto)."""
    reply = hello(client, max_tokens=1, response_format={"type": "text"}, tool_choice="auto", tools=TOOLS,
                  parallel_tool_calls=True, presence_penalty=0, frequency_penalty=0, logit_bias={}, n=1,
                  extra_body={"continue_final_message": False, "repetition_penalty": 1})
    assert reply.choices[0].finish_reason == "length"


def test_tool_choice_none_offers_no_tool(client):
    offered = hello(client, max_tokens=1, tools=TOOLS, tool_choice="auto").usage.prompt_tokens
    none = hello(client, max_tokens=1, tools=TOOLS, tool_choice="none").usage.prompt_tokens
    assert none == hello(client, max_tokens=1).usage.prompt_tokens < offered


def test_a_client_gone_while_its_error_is_sent_leaves_no_traceback(client, url, capfd):
    """The client sends a request that is refused (an unknown route with a long body), then resets the
    connection while the server reads the rest of the body to answer."""
    host, port = url.removeprefix("http://").split(":")
    capfd.readouterr()
    for _ in range(3):
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall(b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.3)                                  # the server is reading the body it refuses
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()                                     # a reset, not a close
    assert hello(client, max_tokens=1).choices[0].finish_reason == "length"
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err
    assert err.count("POST /v1/nothing 404 unknown route: POST /v1/nothing (the client left)") == 3, err


# ----------------------------------------------------------------------------- load

def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


@contextmanager
def server_process(repo, tmp_path):
    """python serve.py ... --port 0 as a subprocess; its base URL and pid, from the line it prints."""
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(repo), "--dtype", "float32",
                             "--device", "cpu", "--port", "0"], cwd=ROOT, stdout=log, stderr=log)
    try:
        deadline, found = time.monotonic() + 60, None
        while found is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", (tmp_path / "server.log").read_text())
        assert found, (tmp_path / "server.log").read_text()
        yield found.group(1), proc.pid
    finally:
        proc.send_signal(signal.SIGINT)      # Ctrl-C: the server closes and exits 0
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
    assert proc.returncode == 0, (tmp_path / "server.log").read_text()[-2000:]


def test_eight_clients_fifty_requests(repo, tmp_path):
    prompts = [f"Question number {k}: what is {k} + {k}?" for k in range(5)]
    with server_process(repo, tmp_path) as (url, pid), \
            OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=120) as client:
        def ask(k: int) -> str:
            messages = [{"role": "user", "content": prompts[k % len(prompts)]}]
            if k % 2:
                return stream_answer(client, messages=messages, temperature=0, max_tokens=8)[1]
            return client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0,
                                                  max_tokens=8).choices[0].message.content
        alone = [ask(0)]
        first_rss = rss_mb(pid)
        alone += [ask(k) for k in range(1, len(prompts))]
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(50), timeout=120))
        seconds = time.perf_counter() - start
        last_rss = rss_mb(pid)
    wrong = [k for k, a in enumerate(answers) if a != alone[k % len(prompts)]]
    print(f"50 requests from 8 clients in {seconds:.2f} s ({50 / seconds:.1f} requests/s, "
          f"{50 * 8 / seconds:.0f} tokens/s); server RSS {first_rss:.0f} MB after the first, "
          f"{last_rss:.0f} MB after the run ({last_rss / first_rss - 1:+.1%})")
    assert len(answers) == 50 and not wrong and all(alone)
    assert last_rss <= 1.10 * first_rss


# ----------------------------------------------------------------------------- compare-server

def test_kl_estimate_is_a_lower_bound():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(50, generator=g).double().log_softmax(-1), torch.randn(50, generator=g).double().log_softmax(-1)
    top = dict(zip(p.topk(5).indices.tolist(), p.topk(5).values.tolist()))
    exact = (p.exp() * (p - q)).sum().item()
    estimate = compare_position(int(p.argmax()), top, q).kl
    assert 0 < estimate <= exact
    assert compare_position(int(p.argmax()), top, p).kl == pytest.approx(0, abs=1e-12)


def test_token_ids_as_servers_name_them(session):
    tok, token_id = session.tokenizer, TokenIds(session.tokenizer)
    paris = tok.encode(" Paris")[0]
    assert token_id({"token": f"token_id:{paris}"}) == paris                      # vLLM, serve.py
    assert token_id({"id": paris, "token": " Paris"}) == paris                    # llama-server
    assert token_id({"token": " Paris", "bytes": list(b" Paris")}) == paris       # the bytes looked up
    assert token_id({"token": "</s>", "bytes": list(b"</s>")}) == tok.eos_id
    with pytest.raises(InputError, match="not a token of the reference's vocabulary"):
        token_id({"token": "x", "bytes": [0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa, 0xf9]})


def test_compare_server_on_the_same_weights(url, repo, capsys):
    assert compare_server.main([f"{url}/v1", "--model", str(repo), "--dtype", "float32", "--device", "cpu",
                      "--prompt", "What is in this image?", "--image", str(repo / "photo.png"),
                      "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "prompt ids          equal" in out and "from /tokenize" in out
    assert "top-1 agreement     1.000000 (12/12)" in out and "first difference    none" in out


def test_compare_server_finds_perturbed_weights(repo, tmp_path, capsys):
    perturbed = tmp_path / repo.name
    perturbed.mkdir()
    for name in ("params.json", "tekken.json"):
        shutil.copy(repo / name, perturbed)
    weights = load_file(str(repo / "consolidated.safetensors"))
    w = weights["layers.1.feed_forward.w2.weight"]
    weights["layers.1.feed_forward.w2.weight"] = w + 0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    save_file(weights, str(perturbed / "consolidated.safetensors"))
    with serving(generate.Session(str(perturbed), device="cpu", dtype="float32")) as url:
        assert compare_server.main([url, "--model", str(repo), "--dtype", "float32", "--device", "cpu",
                          "--prompt", "Hello there", "--max-tokens", "12"]) == 1
    out = capsys.readouterr().out
    print(out)
    assert "prompt ids          equal" in out
    assert re.search(r"first difference    position \d+: server \d+", out) and "context             ..." in out
    assert float(re.search(r"KL\(server\|\|ref\)     mean (\S+),", out).group(1)) > 0
