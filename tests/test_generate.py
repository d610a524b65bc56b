"""The sampler, the dump and compare tools, the hub download; the command line end to end."""
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import chat
import checkpoint
import generate
from dump import compare
from generate import Sampling, filter_probs, sample
from inputs import InputError
from load import load_model
from tekken_files import write_tekken
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------- sampling

def test_greedy_at_temperature_zero():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 4.0]])
    assert sample(logits, Sampling(temperature=0.0)).tolist() == [1, 0]


def test_top_k_keeps_exactly_the_k_most_likely():
    probs = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]])
    kept = filter_probs(probs, top_k=2)
    assert kept.nonzero()[:, 1].tolist() == [1, 3]
    assert torch.equal(kept[0, [1, 3]], probs[0, [1, 3]])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.42, 0.05, 0.31, 0.12]])
    # sorted: 0.42, 0.31, 0.12, 0.10, 0.05; mass before each: 0, .42, .73, .85, .95
    assert filter_probs(probs, top_p=0.5).nonzero()[:, 1].tolist() == [1, 3]
    assert filter_probs(probs, top_p=0.8).nonzero()[:, 1].tolist() == [1, 3, 4]
    assert filter_probs(probs, top_p=0.01).nonzero()[:, 1].tolist() == [1]
    assert filter_probs(probs, top_p=1.0).nonzero()[:, 1].tolist() == [0, 1, 2, 3, 4]


def test_top_p_applies_to_the_top_k_renormalized():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # top-2 renormalized: 0.571, 0.429; top_p 0.5 then keeps only the first
    assert filter_probs(probs, top_p=0.5, top_k=2).nonzero()[:, 1].tolist() == [0]
    assert filter_probs(probs, top_p=0.65, top_k=3).nonzero()[:, 1].tolist() == [0, 1]


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    ids = sample(logits, Sampling(temperature=1.0, top_p=0.7), g)
    freq = torch.bincount(ids, minlength=4) / len(ids)
    assert freq[2:].sum() == 0
    assert abs(freq[0].item() - 0.5 / 0.8) < 0.02


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    s = Sampling(temperature=0.7, top_p=0.95, top_k=50)
    draw = lambda seed: sample(logits, s, torch.Generator().manual_seed(seed)).tolist()   # noqa: E731
    assert draw(7) == draw(7)
    assert any(draw(7) != draw(seed) for seed in range(8, 12))


def test_the_sampler_sorts_only_when_a_filter_applies(monkeypatch):
    """The card's defaults (top_p 1, top_k 0) filter nothing: the vocabulary is not sorted, and the draw is
    multinomial over the softmax itself. top_k alone takes the k largest (no sort); top_p sorts (control)."""
    sorts, real = [], torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **k: sorts.append(self.shape) or real(self, *a, **k))
    logits = torch.randn(2, 131072, generator=torch.Generator().manual_seed(0))
    seeded = lambda: torch.Generator().manual_seed(3)   # noqa: E731
    drawn = sample(logits, Sampling(temperature=0.15), seeded())
    assert sorts == []
    assert drawn.tolist() == torch.multinomial(torch.softmax(logits / 0.15, -1), 1, generator=seeded())[:, 0].tolist()
    top_k = sample(logits, Sampling(temperature=0.15, top_k=50), seeded())
    assert sorts == [] and all(int(t) in logits[i].topk(50).indices for i, t in enumerate(top_k))
    sample(logits, Sampling(temperature=0.15, top_p=0.9), seeded())
    assert sorts == [(2, 131072)]


def test_model_card_defaults():
    assert generate.card_defaults("Mistral-Small-3.2-24B-Instruct-2506") == Sampling(0.15, 1.0, max_tokens=4096)
    assert generate.card_defaults("Magistral-Small-2506") == Sampling(0.7, 0.95, max_tokens=40960)


def test_model_card_defaults_per_magistral_release():
    """Each Magistral card's own sampling, found in hub ids, GGUF and MLX conversions' names alike."""
    for name in ("mistralai/Magistral-Small-2509", "unsloth/Magistral-Small-2509-GGUF:Q4_K_M"):
        assert generate.card_defaults(name) == Sampling(0.7, 0.95, max_tokens=131072)
    for name in ("mistralai/Magistral-Small-2507", "lmstudio-community/Magistral-Small-2507-MLX-4bit"):
        assert generate.card_defaults(name) == Sampling(0.7, 0.95, max_tokens=40960)
    small = Sampling(0.15, 1.0, max_tokens=4096)
    assert generate.card_defaults("mistralai/Mistral-Small-3.1-24B-Instruct-2503") == small
    assert generate.card_defaults("Magistral-Small-2509") is not generate.card_defaults("Magistral-Small-2509")


# ----------------------------------------------------------------------------- streaming

class FakeTokenizer:
    pieces = {5: "é".encode()[:1], 6: "é".encode()[1:], 7: b" ok", 2: b""}
    eos_id, leading_space = 2, False

    def is_special(self, i):
        return i == 2

    def token_bytes(self, i):
        return self.pieces[i]

    def special_id(self, name):
        raise InputError(f"no {name}")


def test_stream_prints_a_split_utf8_character_once_complete():
    stream = chat.OutputStream(FakeTokenizer())
    out = [stream.feed(t) for t in (5, 6, 7, 2)] + [stream.close()]
    assert out[0] == [] and "".join(text for pieces in out for _, text in pieces) == "é ok"


def test_reasoning_split(capsys, tmp_path):
    """The CLI's terminal: a 2506 thought in <think> tags to stderr, the answer to stdout (each without
    the blanks that put it on lines of its own, as parse_output reads it)."""
    tokenizer = Tokenizer.from_file(write_tekken(tmp_path, "v11"))
    stream = chat.OutputStream(tokenizer, tags=True)
    for piece in ("<th", "ink>\nlet me ", "think</thi", "nk>\nThe answer."):
        for token in tokenizer.encode(piece):
            generate.show(stream.feed(token))
    generate.show(stream.close())
    captured = capsys.readouterr()
    assert captured.err == "let me think"
    assert captured.out == "The answer."


# ----------------------------------------------------------------------------- the hub

def test_hub_download_asks_for_exactly_the_needed_files(monkeypatch, tmp_path):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns, kw))
        return str(tmp_path)
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert checkpoint.resolve_model("mistralai/Mistral-Small-3.2-24B-Instruct-2506") == tmp_path
    assert calls == [("mistralai/Mistral-Small-3.2-24B-Instruct-2506",
                      ["params.json", "consolidated*.safetensors", "tekken.json", "SYSTEM_PROMPT.txt"], {})]


def test_unreachable_hub_says_how_to_get_the_files(monkeypatch, capsys):
    def offline(*a, **kw):
        raise OSError("network unreachable")
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert generate.main(["--model", "mistralai/Nope-1", "hi"]) == 2
    err = capsys.readouterr().err
    assert "could not get the files from the Hugging Face hub" in err and "--local-dir" in err


def test_missing_local_folder(capsys):
    assert generate.main(["--model", "./no/such/folder", "hi"]) == 2
    assert "no such folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the command line, end to end

import json  # noqa: E402

from checkpoints import TINY_VISION_PARAMS, hf_mistral3_model  # noqa: E402
from model_folders import write_model_folder  # noqa: E402

PARAMS = {**TINY_VISION_PARAMS, "vocab_size": 131072, "max_position_embeddings": 600}
SYSTEM = "You are {name}, a helpful assistant. Today is {today}."


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A model folder laid out like the official repository, with a tiny random model."""
    folder = tmp_path_factory.mktemp("Mistral-Small-3.2-24B-Instruct-2506")
    weights = write_model_folder(folder, PARAMS, SYSTEM)
    return folder, weights, folder / "photo.png"


@pytest.fixture(scope="module")
def oracle(repo):
    return hf_mistral3_model(repo[1], PARAMS)


@pytest.fixture(scope="module")
def mistral_tokenizer(repo):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    return MistralTokenizer.from_file(str(repo[0] / "tekken.json"))


def official_prompt(mistral_tokenizer, messages, tools=None):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    return mistral_tokenizer.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools))


def test_cli_greedy_equals_transformers_generate(repo, oracle, mistral_tokenizer, tmp_path, capsys):
    folder, _, image = repo
    dump = tmp_path / "dump.safetensors"
    assert generate.main(["--model", str(folder), "--image", str(image), "--temperature", "0", "--dtype",
                          "float32", "--max-tokens", "16", "--dump", str(dump), "What is in this image?"]) == 0
    printed = capsys.readouterr()
    got = load_file(str(dump))

    # the prompt: mistral-common's ids and pixels for the same conversation
    system = SYSTEM.replace("{name}", folder.name).replace("{today}", str(__import__("datetime").date.today()))
    ref = official_prompt(mistral_tokenizer, [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                     {"type": "image_url", "image_url": {"url": image.as_uri()}}]}])
    assert got["prompt_ids"].tolist() == ref.tokens

    # transformers' greedy generate from the same ids and pixels
    pixels = torch.from_numpy(ref.images[0])[None]
    with torch.no_grad():
        expected = oracle.generate(torch.tensor([ref.tokens]), pixel_values=pixels,
                                   image_sizes=torch.tensor([pixels.shape[2:]]), max_new_tokens=16,
                                   do_sample=False, eos_token_id=2, pad_token_id=11)[0, len(ref.tokens):]
        full = torch.cat([got["prompt_ids"], got["generated_ids"][:-1]])[None]
        ref_logits = oracle(full, pixel_values=pixels, image_sizes=torch.tensor([pixels.shape[2:]])).logits[0]
    assert got["generated_ids"].tolist() == expected.tolist()
    assert len(expected) == 16
    diff = (got["logits"] - ref_logits).abs().max().item()
    print(f"greedy: {len(expected)} tokens equal; dump logits vs transformers: max abs diff {diff:.2e}")
    assert diff <= 1e-4
    assert "prompt tokens" in printed.err and "decode" in printed.err


def test_messages_and_tools_give_mistral_common_ids(repo, mistral_tokenizer, tmp_path):
    folder = repo[0]
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Météo d'une ville",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "abcDEF123", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21C."},
        {"role": "user", "content": "And Zürich?"},
    ]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    (tmp_path / "t.json").write_text(json.dumps(tools))
    dump = tmp_path / "d.safetensors"
    assert generate.main(["--model", str(folder), "--messages", str(tmp_path / "m.json"), "--tools",
                          str(tmp_path / "t.json"), "--max-tokens", "2", "--seed", "0", "--dtype", "float32",
                          "--dump", str(dump)]) == 0
    assert load_file(str(dump))["prompt_ids"].tolist() == official_prompt(mistral_tokenizer, messages, tools).tokens


def test_seeded_cli_runs_are_reproducible(repo, tmp_path):
    runs = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.safetensors"
        assert generate.main(["--model", str(repo[0]), "--temperature", "1.0", "--seed", "5", "--max-tokens", "8",
                              "--dtype", "float32", "--dump", str(path), "Hello"]) == 0
        runs.append(load_file(str(path))["generated_ids"].tolist())
    assert runs[0] == runs[1]
    assert compare(tmp_path / "a.safetensors", tmp_path / "b.safetensors").max_abs_diff == 0.0


def test_dump_hidden_holds_each_block_and_the_vision_features(repo, tmp_path):
    dump = tmp_path / "h.safetensors"
    assert generate.main(["--model", str(repo[0]), "--image", str(repo[2]), "--temperature", "0", "--max-tokens",
                          "3", "--dtype", "float32", "--dump", str(dump), "--dump-hidden", "Hi"]) == 0
    got = load_file(str(dump))
    rows = len(got["prompt_ids"]) + len(got["generated_ids"]) - 1
    for i in range(PARAMS["n_layers"]):
        assert got[f"hidden.{i}"].shape == (rows, PARAMS["dim"])
    n_image_tokens = int((got["prompt_ids"] == 10).sum())
    assert got["vision_features"].shape == (n_image_tokens, PARAMS["dim"])


def test_prompt_longer_than_the_context_fails_before_any_compute(repo, monkeypatch, capsys):
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert generate.main(["--model", str(repo[0]), "word " * 700]) == 2
    assert "more than the model's context of 600 tokens" in capsys.readouterr().err


def test_interrupt_stops_cleanly_with_the_text_so_far(repo, monkeypatch):
    model = load_model(repo[0])
    seen, real = [], generate.sample

    def sample(logits, s, generator=None):   # Ctrl-C while the fourth token is computed
        if len(seen) == 3:
            raise KeyboardInterrupt
        seen.append(int(real(logits, s, generator)))
        return real(logits, s, generator)
    monkeypatch.setattr(generate, "sample", sample)
    out, stats = generate.generate(model, [1, 3, 1000, 4], [], 10, Sampling(0.0), {2})
    assert out == seen and len(out) == 3 and stats.generated_tokens == 3


def test_interactive_keeps_the_conversation(repo, interactive_session, capsys):
    prompts = interactive_session(["Hello", f"/image {repo[2]}", "And this?"])
    assert generate.main(["--model", str(repo[0]), "-i", "--max-tokens", "3", "--dtype", "float32",
                          "--temperature", "0"]) == 0
    assert len(prompts) == 2
    assert prompts[1][:len(prompts[0])] == prompts[0]      # the second turn extends the first
    assert 10 in prompts[1] and 10 not in prompts[0]       # the image went with the second message


# ----------------------------------------------------------------------------- the decoding step

def test_generate_equals_greedy_over_full_forwards(repo):
    """The loop (last-position logits at prefill, the cache, decode_step) against plain full forwards;
    twice, the second run on the same cache buffers."""
    model = load_model(repo[0])
    prompt = [1, 3, 1000, 1001, 1002, 4]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    for _ in range(2):
        out, _ = generate.generate(model, prompt, [], 6, Sampling(0.0), set())
        assert out == seq[len(prompt):]


def test_the_decoding_step_is_one_graph(repo):
    """--compile needs decode_step whole, with no host read: no graph break. A generated [IMG] token
    (10) is embedded as it is."""
    model = load_model(repo[0])
    model.setup_cache(1, 8)
    step = torch._dynamo.explain(generate.decode_step)
    explained = step(model, torch.tensor([[10]]), torch.tensor([3]))
    assert explained.graph_count == 1 and explained.graph_break_count == 0


@torch.no_grad()
def test_decoding_reads_the_cache_up_to_the_new_token(repo):
    """An eager step reads the cache up to its own position (length = pos + 1), a compiled one on a GPU
    the whole cache, masked: the same logits. Negative control: one position short misses the token's own key."""
    model = load_model(repo[0])
    model.setup_cache(1, 40)
    model(torch.tensor([[1, 3, 1000, 1001, 1002, 4]]), input_pos=torch.arange(6))
    token, pos = torch.tensor([[1003]]), torch.tensor([6])
    whole = generate.decode_step(model, token, pos)
    read_to_token = generate.decode_step(model, token, pos, kv_len=7)
    one_short = generate.decode_step(model, token, pos, kv_len=6)
    diff = (read_to_token - whole).abs().max().item()
    control = (one_short - whole).abs().max().item()
    print(f"length 7 vs whole cache: {diff:.2e}; length 6: {control:.2e}")
    assert diff <= 1e-5 and control > 1e-2      # (summation order differs with the length)


def test_a_compiled_step_on_the_cpu_reads_the_cache_up_to_its_position(repo, monkeypatch):
    """On the CPU a compiled step is given the length that an eager one reads (pos + 1), not None (the
    whole cache, prompt + max_tokens: slower than eager with the default 4096), and compiles once for
    all the steps of an answer (the length is a dynamic int, not a new graph per position). Same tokens
    as the eager steps."""
    from torch._dynamo.utils import counters
    model = load_model(repo[0])
    prompt, n = [1, 3, 1000, 1001, 1002, 4], 12
    eager, _ = generate.generate(model, prompt, [], n, Sampling(0.0), set())
    torch._dynamo.reset()
    compiled = generate.compiled_decode_step("cpu")
    lengths = []

    def spy(model, token, pos, hidden, length):
        lengths.append(length)
        return compiled(model, token, pos, hidden, length)
    monkeypatch.setattr(generate, "compiled_decode_step", lambda *args: spy)
    graphs = counters["stats"]["unique_graphs"]
    out, _ = generate.generate(model, prompt, [], n, Sampling(0.0), set(), compile=True)
    assert lengths == list(range(len(prompt) + 1, len(prompt) + n))
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert out == eager


def test_hugging_face_layout_folder(repo, oracle, tmp_path, capsys):
    """A local folder in the Hugging Face layout (config.json + model*.safetensors, tekken.json beside)
    answers like the native one."""
    oracle.save_pretrained(tmp_path)
    shutil.copy(repo[0] / "tekken.json", tmp_path)
    args = ["--max-tokens", "4", "--temperature", "0", "--dtype", "float32", "--system", "", "Hello"]
    assert generate.main(["--model", str(repo[0])] + args) == 0
    native = capsys.readouterr().out
    assert generate.main(["--model", str(tmp_path)] + args) == 0
    assert capsys.readouterr().out == native


def test_a_prompt_that_reads_compare_is_a_prompt(repo, capsys):
    assert generate.main(["--model", str(repo[0]), "--temperature", "0", "--max-tokens", "2", "--dtype", "float32",
                          "compare"]) == 0
    assert "prompt tokens" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--compile", "--dump", "x.safetensors"], "--compile and --dump cannot be combined"),
    (["--max-tokens", "0"], "--max-tokens 0: expected an integer >= 1"),
    (["--temperature", "-1"], "--temperature -1.0: expected a finite number >= 0"),
    (["--temperature", "nan"], "--temperature nan: expected a finite number >= 0"),
    (["--top-p", "0"], r"--top-p 0.0: expected a number in \(0, 1\]"),
    (["--top-k", "-2"], "--top-k -2: expected 0"),
    (["--dump-hidden"], "--dump-hidden needs --dump FILE"),
])
def test_flags_refused_before_loading(repo, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(generate, "Session", lambda *a, **k: pytest.fail("the session was made"))
    with pytest.raises(SystemExit) as exit:
        generate.main(["--model", str(repo[0])] + flags + ["hi"])
    assert exit.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_tokenizer_and_params_must_agree_on_images(repo, tmp_path, capsys):
    for path in repo[0].iterdir():
        shutil.copy(path, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    params["vision_encoder"]["image_token_id"] = 11
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert generate.main(["--model", str(tmp_path), "hi"]) == 2
    err = capsys.readouterr().err
    assert "the tokenizer and" in err and "disagree on the [IMG] id: 10 in the tokenizer, 11" in err


def test_a_bug_keeps_its_traceback(repo, monkeypatch):
    """Only bad input becomes a one-line error: a ValueError from a bug is not swallowed."""
    def broken(*args, **kwargs):
        raise ValueError("a bug deep inside")
    monkeypatch.setattr(generate, "encode_chat", broken)
    with pytest.raises(ValueError, match="a bug deep inside"):
        generate.main(["--model", str(repo[0]), "--max-tokens", "2", "hi"])


def test_session_from_python(repo):
    session = generate.Session(str(repo[0]), device="cpu", dtype="float32")
    reply = session.answer([{"role": "user", "content": "Hello"}], sampling=Sampling(0.0, max_tokens=3))
    assert len(reply.ids) == 3 and reply.stats.generated_tokens == 3
    again = session.answer([{"role": "user", "content": "Hello"}], sampling=Sampling(0.0, max_tokens=3))
    assert again.ids == reply.ids and again.prompt_ids == reply.prompt_ids
