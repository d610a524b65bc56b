"""compare_server.py --suite against real servers: serve.py (the control: every case conforms), mlx_lm.server
(mlx-lm on the CPU) and llama-server (when LLAMA_SERVER names a built binary), all on the same tiny random
Mistral 3; a negative control for each layer; the ways servers name, merge and hold back tokens.

Every server listens on 127.0.0.1 on a free port and is stopped at the end; every wait is bounded."""
import json
import os
import re
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import batch
import compare_server
import generate
import serve
from checkpoints import TINY_VISION_PARAMS, write_native
from compare_server import Answer, Token, TokenIds, allowed_top, identify, teacher_force
from peers import llama_server, mlx_server, to_gguf, tool_caller, write_hf
from tekken_files import write_tekken
from tokenizer import Tokenizer
from test_chat_template import CORRECT
from test_serve import serving

# room for an image of 1295 tokens; a third vision block, as llama.cpp's converter numbers the projector's
# linear_1 and linear_2 like blocks (with two blocks, linear_2 is not a name it maps)
PARAMS = {**TINY_VISION_PARAMS, "vocab_size": 131072, "max_position_embeddings": 2048,
          "vision_encoder": {**TINY_VISION_PARAMS["vision_encoder"], "num_hidden_layers": 3}}
CASES = list(compare_server.suite_cases())
IMAGE_CASES = [name for name, case in compare_server.suite_cases().items() if compare_server.has_images(case.messages)]
ARGUMENTS = '{"city": "Paris"}'


def save(folder: Path, weights: dict) -> Path:
    """A native checkpoint of these weights (and the v11 tokenizer) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(PARAMS))
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "consolidated.safetensors")
    write_tekken(folder, "v11")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("reference")
    weights = write_native(folder, PARAMS, seed=3)
    write_tekken(folder, "v11")
    return folder, weights


@pytest.fixture(scope="module")
def session(reference):
    session = generate.Session(str(reference[0]), device="cpu", dtype="float32")
    session.load()
    return session


def call_chain(tokenizer) -> list[int]:
    """What the model answers to call get_weather(city="Paris") in the v11 layout, after [/INST]."""
    return [tokenizer.special_id("[/INST]"), tokenizer.special_id("[TOOL_CALLS]"), *tokenizer.encode("get_weather"),
            tokenizer.special_id("[ARGS]"), *tokenizer.encode(ARGUMENTS), tokenizer.eos_id]


@pytest.fixture(scope="module")
def caller(reference, session, tmp_path_factory) -> tuple[Path, dict]:
    """A model that calls get_weather(city="Paris") at temperature 0 whenever a user message ends the prompt."""
    weights = tool_caller(reference[1], PARAMS, call_chain(session.tokenizer))
    return save(tmp_path_factory.mktemp("caller"), weights), weights


def suite(url: str, model: Path, capsys, *flags: str) -> tuple[int, dict[str, str]]:
    """compare_server --suite's exit status and each case's line."""
    code = compare_server.main([url, "--model", str(model), "--dtype", "float32", "--device", "cpu", "--suite",
                                "--max-tokens", "16", *flags])
    out = capsys.readouterr().out
    print(out)
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in CASES}
    return code, lines


# ----------------------------------------------------------------------------- serve.py: the control

def test_serve_py_conforms_in_every_case(session, reference, capsys):
    with serving(session) as url:
        code, lines = suite(url, reference[0], capsys)
    assert code == 0 and list(lines) == CASES
    for name, line in lines.items():
        assert line.endswith("conforms"), line
        assert re.search(r"ok KL max \S+, top-1 16/16", line) and "ok ids" in line


def test_perturbed_weights_fail_the_model_layer(reference, tmp_path, capsys):
    weights = dict(reference[1])
    w = weights["layers.1.feed_forward.w2.weight"]
    weights["layers.1.feed_forward.w2.weight"] = w + 0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    perturbed = generate.Session(str(save(tmp_path / "perturbed", weights)), device="cpu", dtype="float32")
    with serving(perturbed) as url:
        code, lines = suite(url, reference[0], capsys, "--cases", "plain_text,image_28_multiple")
    assert code == 1 and list(lines) == ["plain_text", "image_28_multiple"]
    for line in lines.values():
        assert "departs at the model layer: KL max" in line and "ok ids" in line, line


def test_a_token_other_than_the_argmax_fails_the_decoding_layer(reference, session, monkeypatch, capsys):
    """serve.py whose sampler takes the second most likely token at the third step, temperature 0 or not."""
    real, steps = batch.sample, []

    def sample(logits, s, generator=None):
        steps.append(1)
        return logits.topk(2).indices[..., 1].reshape(1) if len(steps) == 3 else real(logits, s, generator)
    monkeypatch.setattr(batch, "sample", sample)
    with serving(session) as url:
        code, lines = suite(url, reference[0], capsys, "--cases", "plain_text")
    assert code == 1 and "departs at the decoding layer: position 2: took" in lines["plain_text"]
    assert "ok KL max" in lines["plain_text"]


class InjectingSession(generate.Session):
    """serve.py as a server whose template injects a system prompt when the conversation has none."""

    def encode(self, messages, tools=None):
        if not messages or messages[0].get("role") != "system":
            messages = [{"role": "system", "content": "You are a robot."}] + messages
        return super().encode(messages, tools)


def test_an_injected_system_prompt_fails_the_prompt_layer(reference, capsys):
    with serving(InjectingSession(str(reference[0]), device="cpu", dtype="float32")) as url:
        code, lines = suite(url, reference[0], capsys, "--cases", "plain_text,system_prompt")
    assert code == 1
    assert "departs at the prompt layer: ids differ at 1 " in lines["plain_text"]
    assert "a default system prompt is injected" in lines["plain_text"]
    assert lines["system_prompt"].endswith("conforms")


def test_tool_calls_parse_alike_and_double_encoded_arguments_fail_the_parsing_layer(caller, monkeypatch, capsys):
    with serving(generate.Session(str(caller[0]), device="cpu", dtype="float32")) as url:
        code, lines = suite(url, caller[0], capsys, "--cases", "tools_offered,tools_streamed")
        assert code == 0
        assert all(line.endswith("conforms") for line in lines.values())
        real = serve.tool_call
        monkeypatch.setattr(serve, "tool_call", lambda call: {**real(call), "function": {
            "name": call.name, "arguments": json.dumps(call.raw_arguments)}})
        code, lines = suite(url, caller[0], capsys, "--cases", "tools_offered")
    assert code == 1
    assert "departs at the parsing layer: tool call 0: the arguments are double-encoded" in lines["tools_offered"]


@pytest.fixture(scope="module")
def thinker(reference, tmp_path_factory) -> Path:
    """Magistral 2509's layout (v13, [THINK] tokens): a model that thinks, then answers, at temperature 0."""
    folder = tmp_path_factory.mktemp("Magistral-Small-2509")
    tokenizer = Tokenizer.from_file(write_tekken(folder, "v13"))
    chain = [tokenizer.special_id("[/INST]"), tokenizer.special_id("[THINK]"), *tokenizer.encode("Seventeen times"),
             tokenizer.special_id("[/THINK]"), *tokenizer.encode("391."), tokenizer.eos_id]
    save_file({k: v.contiguous() for k, v in tool_caller(reference[1], PARAMS, chain).items()},
              folder / "consolidated.safetensors")
    (folder / "params.json").write_text(json.dumps(PARAMS))
    return folder


def test_the_reasoning_split_conforms_and_a_thought_left_in_the_content_fails_the_parsing_layer(
        thinker, monkeypatch, capsys):
    with serving(generate.Session(str(thinker), device="cpu", dtype="float32")) as url:
        code, lines = suite(url, thinker, capsys, "--cases", "reasoning_split")
        assert code == 0 and lines["reasoning_split"].endswith("conforms")
        # a server whose reasoning parser is off: the thought stays in the content, as text
        def as_content(self, pieces, entries):
            for _, text in pieces:
                self.add_text(text)
            return serve.Delta(self.unsent(), entries)
        monkeypatch.setattr(serve.Answer, "delta", as_content)
        monkeypatch.setattr(serve, "reasoning_fields", lambda thought: {})
        code, lines = suite(url, thinker, capsys, "--cases", "reasoning_split")
    assert code == 1
    assert "departs at the parsing layer" in lines["reasoning_split"]
    assert "does not split the thought off (no reasoning_content or reasoning field): leaves it in the content" \
        in lines["reasoning_split"]


class VllmSurface(BaseHTTPRequestHandler):
    """vLLM's way of telling ids, in front of serve.py: no /tokenize, the answer's prompt_token_ids and
    token_ids (return_token_ids), logprob entries that name tokens by their text alone."""
    upstream: str

    def do_GET(self):
        self.relay(urllib.request.Request(self.upstream + self.path))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            return self.relay(None, 404, {"error": {"message": "Not Found"}})
        answer = post(self.upstream + self.path, {**body, "return_tokens_as_token_ids": True})
        entries = answer["choices"][0]["logprobs"]["content"]
        answer["prompt_token_ids"] = post(self.upstream + "/tokenize", body)["tokens"]
        answer["choices"][0]["token_ids"] = [int(e["token"].removeprefix("token_id:")) for e in entries]
        for entry in [e for e in entries] + [t for e in entries for t in e["top_logprobs"]]:
            entry["token"] = bytes(entry["bytes"]).decode(errors="replace")
        self.relay(None, 200, answer)

    def relay(self, request, status=200, body=None):
        if request is not None:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = json.loads(response.read())
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_prompt_and_token_ids_from_the_answer_as_vllm_tells_them(session, reference, capsys):
    with serving(session) as upstream:
        handler = type("Handler", (VllmSurface,), {"upstream": upstream})
        proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=proxy.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{proxy.server_address[1]}"
            code = compare_server.main([url, "--model", str(reference[0]), "--dtype", "float32", "--device", "cpu",
                                        "--prompt", "What is [INST]?", "--max-tokens", "8"])
        finally:
            proxy.shutdown()
            proxy.server_close()
            thread.join(timeout=10)
    out, err = capsys.readouterr()
    print(out, err)
    assert code == 0 and "verdict             conforms" in out
    assert "from the answer's prompt_token_ids" in out and "tokens: 8, the answer's token_ids" in out


# ----------------------------------------------------------------------------- how servers name their tokens

def answer(content: str, entries: list[dict]) -> Answer:
    return Answer(content, [], None, "length", entries, {}, None, None)


def test_tokens_named_by_wrong_ids_are_identified_by_their_text(session):
    """mlx_lm.server's entry names the first of its alternatives, not the token it chose."""
    tok, token_id = session.tokenizer, TokenIds(session.tokenizer)
    ids = tok.encode(" Paris is nice")
    others = tok.encode(" London")
    entries = [{"id": others[0], "token": "x", "logprob": -3.0,
                "top_logprobs": [{"id": others[0], "logprob": -3.0}, {"id": i, "logprob": -1.0}]} for i in ids]
    found = identify(token_id, answer(" Paris is nice", entries))
    assert [t.id for t in found.tokens] == ids and "by their text" in found.how and not found.problem
    # negative controls: a text none of the alternatives spells, then with entries that name nothing
    unchecked = identify(token_id, answer(" Rome is nice", entries))
    assert [t.id for t in unchecked.tokens] == [others[0]] * 3 and "unchecked" in unchecked.how
    nameless = [{**e, "id": None, "token": "token_id:999999999"} for e in entries]
    assert identify(token_id, answer(" Rome is nice", nameless)).problem


def test_held_back_tokens_are_spelled_by_the_reference(session):
    """llama-server sends no entry for a token that ends inside a UTF-8 character: the next entry carries
    both texts. The held text becomes the tokens the reference prefers among those that spell it."""
    tok, token_id = session.tokenizer, TokenIds(session.tokenizer)
    model = session.load()
    prompt = tok.encode("Hello", bos=True)
    byte = token_id.by_bytes
    held, last = "日".encode(), tok.encode(" ok")[0]
    entries = [{"id": last, "token": "日 ok", "bytes": list(held + tok.token_bytes(last)), "logprob": -1.0,
                "top_logprobs": []}]
    found = identify(token_id, answer("日 ok", entries))
    assert [(t.id, t.held) for t in found.tokens] == [(None, held), (last, b"")] and "held back" in found.how
    tokens, rows, _ = teacher_force(model, byte, prompt, [], found.tokens)
    spelled = [t.id for t in tokens[:-1]]
    assert b"".join(tok.token_bytes(i) for i in spelled) == held and tokens[-1].id == last
    first = model(torch.tensor([prompt]))[0, -1].double().log_softmax(-1)   # no cache: independent
    candidates = [byte[held[:n]] for n in range(1, len(held) + 1) if held[:n] in byte]
    assert len(candidates) > 1 and spelled[0] == max(candidates, key=lambda i: first[i].item())
    assert rows.shape == (len(tokens), tok.n_words) and torch.allclose(rows[0], first, atol=1e-5)


def test_top_logprobs_negotiated():
    assert allowed_top('{"error": "top_logprobs must be at most 11"}', 20) == 11
    assert allowed_top("Requested top_logprobs of 20 exceeds maximum of 5", 20) == 5
    assert allowed_top("top_logprobs: too many", 20) == 10 and allowed_top("no", 1) == 0


# ----------------------------------------------------------------------------- real peers

@pytest.fixture(scope="module")
def hf(reference, tmp_path_factory) -> Path:
    return write_hf(tmp_path_factory.mktemp("hf"), reference[1], PARAMS, CORRECT)


def test_mlx_lm_server(hf, reference, tmp_path, capsys):
    """mlx_lm.server agrees at the model layer wherever its prompt is the official one; where it departs,
    the suite names mlx-lm's own behaviour (see the docs' closing note)."""
    with mlx_server(hf, tmp_path / "mlx.log") as url:
        code, lines = suite(url, reference[0], capsys)
    assert code == 1 and list(lines) == CASES
    for name in IMAGE_CASES:
        assert "skipped: the server takes no images" in lines[name]
    assert "departs at the prompt layer: length differs: usage.prompt_tokens" in lines["control_token_text"]
    # text parts joined without the blank line: the same length here, so the model layer shows it
    assert "departs at the model layer" in lines["multi_part_text"] and "length only" in lines["multi_part_text"]
    for name in set(CASES) - set(IMAGE_CASES) - {"control_token_text", "multi_part_text"}:
        assert "ok length" in lines[name] and re.search(r"ok KL max \S+, top-1 16/16", lines[name]), lines[name]
        assert lines[name].endswith("conforms") or "departs at the parsing layer: content differs: the server " \
               "drops the answer's leading whitespace" in lines[name] or "writes the control token" in lines[name]


@pytest.mark.llama_server
@pytest.mark.skipif(not os.environ.get("LLAMA_SERVER"), reason="LLAMA_SERVER=path/to/llama-server not set")
def test_llama_server(hf, reference, caller, tmp_path, capsys):
    """llama-server agrees at the model layer wherever its prompt is the official one, images included;
    where it departs, the suite names llama.cpp's own behaviour (see the docs' closing note)."""
    # the converter of the same source tree: LLAMA_CONVERT, else that of an in-tree build (llama.cpp/build/bin)
    converter = Path(os.environ.get("LLAMA_CONVERT") or
                     Path(os.environ["LLAMA_SERVER"]).parents[2] / "convert_hf_to_gguf.py")
    assert converter.is_file(), f"{converter}: no such file; set LLAMA_CONVERT=path/to/convert_hf_to_gguf.py"
    model, mmproj = to_gguf(hf, reference[0], converter, tmp_path)
    with llama_server(os.environ["LLAMA_SERVER"], model, mmproj, tmp_path / "llama.log") as url:
        code, lines = suite(url, reference[0], capsys)
    assert code == 1 and list(lines) == CASES
    departs = {
        "multi_part_text": "departs at the prompt layer: ids differ at 6 ",          # parts joined by one newline
        "control_token_text": "departs at the prompt layer: ids differ at 4 of 24 (theirs 18, from /apply-template"
                              " + /tokenize): text became control tokens ([INST], </s>, [TOOL_CALLS])",
        "images_odd_sizes": "departs at the prompt layer: length differs",           # the grid rounded down
        "image_over_1024_tokens": "departs at the prompt layer: length differs: usage.prompt_tokens 1031",  # capped
        "text_then_image": "departs at the model layer",                             # the image left after the text
    }
    for name, line in lines.items():
        if name in departs:
            assert departs[name] in line, line
        else:    # tools offered: the content loses its leading space
            assert line.endswith("conforms") or "drops the answer's leading whitespace" in line, line
            assert "ok ids" in line or "ok length" in line and "image" in name, line
            assert re.search(r"ok KL max \S+, top-1 (\d+)/\1", line), line

    hf_caller = write_hf(tmp_path / "hf-caller", caller[1], PARAMS, CORRECT)
    (tmp_path / "caller").mkdir()
    model, mmproj = to_gguf(hf_caller, caller[0], converter, tmp_path / "caller")
    with llama_server(os.environ["LLAMA_SERVER"], model, mmproj, tmp_path / "llama-caller.log") as url:
        code, lines = suite(url, caller[0], capsys, "--cases", "plain_text,tools_offered,tool_result_fed_back")
    # without tools offered the call stays in the content; with tools, its grammar forces a second [ARGS]
    assert "departs at the parsing layer: the server leaves the tool call in the content, unparsed" in lines["plain_text"]
    assert "departs at the decoding layer: position 5: took '[ARGS]'" in lines["tools_offered"]
    assert lines["tool_result_fed_back"].endswith("conforms")
