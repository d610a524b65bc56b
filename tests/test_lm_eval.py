"""lm-evaluation-harness against serve.py: a loglikelihood task through local-completions (echo and
prompt logprobs) and a generate-until task through local-chat-completions, on a tiny checkpoint and tiny
tasks defined here (no dataset is downloaded); the answers are those of the model run in-process.

The server needs an API key here, so that the harness's requests show that they send it."""
import threading
from contextlib import contextmanager

import datasets
import lm_eval
import pytest
import torch

import generate
import serve
from chat import encode_chat
from checkpoints import TINY_PARAMS, write_native
from load import load_model
from tekken_files import write_tekken

MODEL_ID = "tiny"
KEY = "sk-test-key"
CHOICE_DOCS = [
    {"question": "The sky is", "choices": ["blue", "green", "made of cheese"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "answer": 0},
    {"question": "Paris is the capital of", "choices": ["France", "Spain", "the moon", "Italy"], "answer": 0},
    {"question": "Water boils at", "choices": ["100 degrees", "12 degrees"], "answer": 0},
    {"question": "Ice is", "choices": [" cold", "hot"], "answer": 0},      # a space at the start of a choice
]
GEN_DOCS = [{"question": f"Count from {k} to {k + 3}.", "answer": "x"} for k in range(4)]
MAX_GEN = 8


def task(name: str, docs: list[dict], **config) -> dict:
    """An lm-eval task configuration whose documents are `docs` (a custom dataset: nothing to download)."""
    return {"task": name, "custom_dataset": lambda **_: {"test": datasets.Dataset.from_list(docs)},
            "test_split": "test", "doc_to_text": "{{question}}", **config}


CHOICE_TASK = task("tiny_choice", CHOICE_DOCS, output_type="multiple_choice", doc_to_choice="{{choices}}",
                   doc_to_target="{{answer}}", metric_list=[{"metric": "acc"}])
GEN_TASK = task("tiny_generate", GEN_DOCS, output_type="generate_until", doc_to_target="{{answer}}",
                generation_kwargs={"until": ["\n\n"], "max_gen_toks": MAX_GEN, "do_sample": False},
                metric_list=[{"metric": "exact_match"}])


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_native(folder, {**TINY_PARAMS, "vocab_size": 131072, "max_position_embeddings": 256}, seed=5)
    write_tekken(folder, "v11")
    return folder


@pytest.fixture(scope="module")
def reference(repo):
    """The model run in-process, without the server (its own copy of the weights)."""
    return load_model(repo).eval()


@contextmanager
def serving(repo):
    session = generate.Session(str(repo), device="cpu", dtype="float32")
    session.load()
    server = serve.Server(session, MODEL_ID, port=0, max_batch=4, api_key=KEY)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", session
    finally:
        server.close()
        thread.join(timeout=10)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)                  # what lm-eval's API models send as the key
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def evaluate(url: str, route: str, tasks: list[dict], **model_args) -> dict:
    return lm_eval.simple_evaluate(
        model="local-completions" if route == "completions" else "local-chat-completions",
        model_args={"base_url": f"{url}/v1/{route}", "model": MODEL_ID, "auth_token": KEY, "max_retries": 1,
                    **model_args},
        tasks=tasks, log_samples=True, apply_chat_template=route == "chat/completions", random_seed=0,
        numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def lm_eval_split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The ids lm-eval scores: trailing spaces of the context move to the continuation, the whole is
    encoded (no <s>: its remote tokenizer asks for none) and split after the context's own ids."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return head, whole[len(head):]


@torch.inference_mode()
def loglikelihood_differences(results: dict, reference, tokenizer) -> tuple[list[float], int]:
    """|lm-eval's loglikelihood - the in-process one| for every (context, choice) scored, and how many of
    its is_greedy flags differ from the in-process ones."""
    differences, greedy_differ = [], 0
    for sample in results["samples"]["tiny_choice"]:
        for (context, continuation), [(served, greedy)] in zip(sample["arguments"], sample["resps"]):
            head, tail = lm_eval_split(tokenizer, context, continuation)
            ids = torch.tensor([head + tail])
            logprobs = reference(ids)[0].log_softmax(-1)                            # [S, V]
            rows = logprobs[len(head) - 1:-1]                                      # the distributions of `tail`
            expected = rows.gather(-1, ids[0, len(head):, None]).sum().item()
            greedy_differ += greedy != bool((rows.argmax(-1) == ids[0, len(head):]).all())
            differences.append(abs(served - expected))
    return differences, greedy_differ


def test_loglikelihoods_through_local_completions(repo, reference, monkeypatch):
    with serving(repo) as (url, session):
        results = evaluate(url, "completions", [CHOICE_TASK], num_concurrent=3, batch_size=2)
        differences, greedy_differ = loglikelihood_differences(results, reference, session.tokenizer)
        print(f"\nlm-eval through serve.py, {len(differences)} loglikelihoods: max |served - in-process| "
              f"{max(differences):.2e}; acc {results['results']['tiny_choice']['acc,none']}")
        assert len(differences) == sum(len(d["choices"]) for d in CHOICE_DOCS)
        assert max(differences) < 1e-4 and greedy_differ == 0

        real = serve.read_prompts                                 # negative control: the first token dropped
        monkeypatch.setattr(serve, "read_prompts", lambda prompt, tokenizer: [p[1:] for p in real(prompt, tokenizer)])
        dropped, _ = loglikelihood_differences(evaluate(url, "completions", [CHOICE_TASK], num_concurrent=3),
                                               reference, session.tokenizer)
        print(f"a server that drops the first prompt token: max difference {max(dropped):.2e}")
        assert max(dropped) > 1e-2


@torch.inference_mode()
def test_generate_until_through_local_chat_completions(repo, reference):
    with serving(repo) as (url, session):
        results = evaluate(url, "chat/completions", [GEN_TASK], num_concurrent=4)
    tokenizer = session.tokenizer
    samples = results["samples"]["tiny_generate"]
    assert len(samples) == len(GEN_DOCS)
    for sample in samples:
        messages = [{"role": "user", "content": sample["doc"]["question"]}]
        ids, _ = encode_chat(tokenizer, messages)
        answer, _ = generate.generate(reference, ids, [], MAX_GEN, generate.Sampling(temperature=0),
                                      {tokenizer.eos_id})
        expected = tokenizer.decode(answer).split("\n\n")[0]
        assert sample["resps"][0][0] == expected and expected
    print(f"\nlm-eval generate-until through serve.py: {len(samples)} answers, each the in-process greedy one")
