"""A reasoning model's answer through serve.py, read by the real openai client: the thought in
`reasoning_content` (and `reasoning`), the answer in `content`, streamed and not; an assistant message
sent back with its thought laid out as chat.encode_chat lays it (mistral-common's layout, tests/test_reasoning.py).

The tiny random model would not think by itself: the sampler is scripted to write a given answer, so
that what is tested is the server's reading of the ids, for both forms (v13 [THINK] tokens, 2506 tags)."""
from contextlib import contextmanager

import pytest
import torch
from openai import OpenAI

import batch
import generate
from chat import encode_chat
from checkpoints import TINY_VISION_PARAMS, write_native
from test_serve import raw, serving
from tekken_files import write_tekken

PARAMS = {**TINY_VISION_PARAMS, "vocab_size": 131072, "max_position_embeddings": 300}
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module", params=[("Magistral-Small-2509", "v13"), ("Magistral-Small-2506", "v11")])
def session(request, tmp_path_factory):
    name, version = request.param
    folder = tmp_path_factory.mktemp(name)
    write_native(folder, PARAMS, seed=3)
    write_tekken(folder, version)
    session = generate.Session(str(folder), device="cpu", dtype="float32")
    session.load()
    return session


def answer_ids(tokenizer, thought: str, answer: str, call: bool = False) -> list[int]:
    """The ids a reasoning model writes for `thought` then `answer` (a tool call's arguments if call)."""
    if tokenizer.version == "v13":
        ids = ([tokenizer.special_id("[THINK]")] + tokenizer.encode(thought) +
               [tokenizer.special_id("[/THINK]")])
    else:
        ids = tokenizer.encode(f"<think>\n{thought}\n</think>\n")
    if call:
        ids += ([tokenizer.special_id("[TOOL_CALLS]")] + tokenizer.encode("get_weather") +
                [tokenizer.special_id("[ARGS]")])
    return ids + tokenizer.encode(answer) + [tokenizer.eos_id]


@contextmanager
def scripted(monkeypatch, ids: list[int]):
    """The sampler writes `ids`, whatever the logits, for one request."""
    script = iter(ids)

    def sample(logits, s, generator=None):
        return torch.tensor([next(script)])
    with monkeypatch.context() as m:
        m.setattr(batch, "sample", sample)
        yield


def fields(message) -> dict:
    return {key: getattr(message, key, None) for key in ("reasoning_content", "reasoning", "content")}


def streamed_fields(client, **request) -> tuple[dict, list]:
    """The streamed deltas concatenated field by field, and the tool-call deltas."""
    joined, calls = {"reasoning_content": "", "reasoning": "", "content": ""}, []
    for chunk in client.chat.completions.create(stream=True, **request):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for key in joined:
            joined[key] += getattr(delta, key, None) or ""
        calls += delta.tool_calls or []
    return joined, calls


def test_reasoning_content_streamed_and_not(session, monkeypatch):
    thought, answer = "The user greets me; é is two bytes.", "Hello! How can I help?"
    ids = answer_ids(session.tokenizer, thought, answer)
    with serving(session) as url, OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=60) as client:
        with scripted(monkeypatch, ids):
            whole = client.chat.completions.create(model="m", messages=HI, max_tokens=100)
        with scripted(monkeypatch, ids):
            joined, _ = streamed_fields(client, model="m", messages=HI, max_tokens=100)
    assert fields(whole.choices[0].message) == {"reasoning_content": thought, "reasoning": thought, "content": answer}
    assert joined == {"reasoning_content": thought, "reasoning": thought, "content": answer}
    assert whole.choices[0].finish_reason == "stop"


def test_a_cut_off_thought_has_reasoning_and_no_content(session, monkeypatch):
    ids = answer_ids(session.tokenizer, "one two three four five six seven", "never reached")
    with serving(session) as url, OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=60) as client:
        with scripted(monkeypatch, ids):
            whole = client.chat.completions.create(model="m", messages=HI, max_tokens=5)
        with scripted(monkeypatch, ids):
            joined, _ = streamed_fields(client, model="m", messages=HI, max_tokens=5)
    message = whole.choices[0].message
    assert message.reasoning_content and not message.content and whole.choices[0].finish_reason == "length"
    assert joined == {**fields(message), "content": ""}


def test_a_tool_call_after_the_thought(session, monkeypatch):
    ids = answer_ids(session.tokenizer, "I need the weather.", '{"city": "Paris"}', call=True)
    with serving(session) as url, OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=60) as client:
        with scripted(monkeypatch, ids):
            whole = client.chat.completions.create(model="m", messages=HI, max_tokens=100)
        with scripted(monkeypatch, ids):
            joined, calls = streamed_fields(client, model="m", messages=HI, max_tokens=100)
    message = whole.choices[0].message
    assert message.reasoning_content == "I need the weather." and not message.content
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("get_weather", '{"city": "Paris"}')]
    assert joined == {"reasoning_content": "I need the weather.", "reasoning": "I need the weather.", "content": ""}
    assert "".join(c.function.arguments or "" for c in calls) == '{"city": "Paris"}'


def test_a_thought_sent_back_is_laid_out_as_encode_chat_lays_it(session):
    """The message the server returned, sent back: its prompt holds the thought, as encode_chat (and so
    mistral-common) lays it; without the thought, another prompt (a negative control)."""
    back = {"role": "assistant", "content": "Hello!", "reasoning_content": "A greeting.", "reasoning": "A greeting."}
    conversation = HI + [back, {"role": "user", "content": "Thanks"}]
    with serving(session) as url:
        status, got = raw(url, "POST", "/tokenize", {"messages": conversation})
        _, without = raw(url, "POST", "/tokenize", {"messages": HI + [{"role": "assistant", "content": "Hello!"},
                                                                      {"role": "user", "content": "Thanks"}]})
    assert status == 200 and got["tokens"] == encode_chat(session.tokenizer, conversation)[0]
    assert without["tokens"] != got["tokens"]
