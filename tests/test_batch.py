"""The batching engine (batch.py): answers that share decoding steps are each the answer they would be
alone (generate.stream on its own), whatever arrives, leaves or fails around them."""
import threading
import time

import pytest
import torch

import batch
import generate
from checkpoints import TINY_PARAMS, write_native
from generate import Sampling
from inputs import InputError
from tekken_files import write_tekken

GREEDY, WARM = Sampling(temperature=0.0), Sampling(temperature=1.0, top_p=0.9)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_native(folder, {**TINY_PARAMS, "vocab_size": 131072, "max_position_embeddings": 300}, seed=7)
    write_tekken(folder, "v11")
    session = generate.Session(str(folder), device="cpu", dtype="float32")
    session.load()
    return session


def requests(session) -> list[tuple[list[int], Sampling, int | None]]:
    """Prompts of different lengths, greedy and seeded answers of different lengths: (ids, sampling, seed)."""
    tok = session.tokenizer
    return [(tok.encode(f"Question {k}: what is {k} plus {3 * k}? " * (1 + k % 3), bos=True),
             Sampling(GREEDY.temperature, max_tokens=10 + 4 * k) if k % 2 == 0 else
             Sampling(WARM.temperature, WARM.top_p, max_tokens=16), None if k % 2 == 0 else 100 + k)
            for k in range(7)]


@pytest.fixture(scope="module")
def asked(session) -> list[tuple[list[int], Sampling, int | None]]:
    return requests(session)


@pytest.fixture(scope="module")
def expected(session, asked) -> list[tuple[list[int], torch.Tensor]]:
    """Each request's answer alone: its ids and the logits [n, V] each was sampled from."""
    return [alone(session, *request) for request in asked]


def alone(session, ids, sampling, seed) -> tuple[list[int], torch.Tensor]:
    steps = list(generate.stream(session.model, ids, [], sampling.max_tokens, sampling, {session.tokenizer.eos_id},
                                 seed, logits=True))
    return [s.token for s in steps], torch.stack([s.logits[-1] for s in steps])


def together(session, asked, max_batch: int = 3, stagger: float = 0.02) -> list[tuple[list[int], torch.Tensor]]:
    """Each request from its own thread, one every `stagger` seconds, through one engine."""
    engine, answers = batch.Engine(session, max_batch=max_batch), [None] * len(asked)

    def ask(k: int):
        time.sleep(stagger * k)
        ids, sampling, seed = asked[k]
        steps = list(engine.submit(ids, [], sampling, seed, logits=True).steps())
        answers[k] = [s.token for s in steps], torch.stack([s.logits[-1] for s in steps])
    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(asked))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        engine.close()
    return answers


@pytest.fixture
def batch_sizes(monkeypatch):
    """The number of sequences in each decoding step the engine runs; the cache grows 8 positions at a
    time, so that it grows while answers run."""
    sizes, real = [], batch.decode_step

    def recording(model, tokens, pos, *args):
        sizes.append(tokens.shape[0])
        return real(model, tokens, pos, *args)
    monkeypatch.setattr(batch, "decode_step", recording)
    monkeypatch.setattr(batch, "GROWTH", 8)
    return sizes


def test_each_answer_is_the_one_it_would_be_alone(session, asked, expected, batch_sizes):
    answers = together(session, asked)
    assert max(batch_sizes) == 3 and min(batch_sizes) == 1     # batched, up to max_batch; newcomers waited
    for (ids, logits), (want_ids, want_logits) in zip(answers, expected):
        assert ids == want_ids                                  # greedy and seeded tokens alike
    difference = max((got - want).abs().max().item() for (_, got), (_, want) in zip(answers, expected))
    print(f"\n{len(asked)} answers through batches of up to 3: same tokens; logits max |batched - alone| "
          f"{difference:.1e}")
    assert difference < 1e-4


def test_negative_control_one_position_for_the_whole_batch(session, asked, expected, monkeypatch):
    """A batched step that gives every row the same position (the furthest), as a decoder without a
    position per row would, changes the answers: the comparison above can fail."""
    real = batch.decode_step
    monkeypatch.setattr(batch, "decode_step",
                        lambda model, tokens, pos, *args: real(model, tokens, pos.max().expand_as(pos), *args))
    answers = together(session, asked[:4], stagger=0)
    wrong = [k for k, (got, want) in enumerate(zip(answers, expected)) if got[0] != want[0]]
    assert len(wrong) >= 2


def test_seeded_sampling_is_the_same_whatever_runs_beside_it(session):
    ids = session.tokenizer.encode("Tell me a story about a dragon.", bos=True)
    sampled = Sampling(temperature=1.0, max_tokens=20)
    others = [(ids[:5], sampled, None), (ids[:7], Sampling(0.0, max_tokens=25), None), (ids, sampled, 3)]
    (first, _), (second, _) = [together(session, [(ids, sampled, 42), *others], max_batch=4, stagger=0)[0]
                               for _ in range(2)]
    assert first == second == alone(session, ids, sampled, 42)[0]
    assert together(session, [(ids, sampled, 43)])[0][0] != first           # another seed, another answer


def test_a_consumer_that_leaves_frees_its_row(session):
    """With one row, an abandoned answer stops at the next step and the next request gets the row."""
    engine = batch.Engine(session, max_batch=1)
    try:
        ids = session.tokenizer.encode("Hello", bos=True)
        long = engine.submit(ids, [], Sampling(0.0, max_tokens=250))
        steps = long.steps()
        next(steps), next(steps)
        steps.close()                                              # the consumer leaves
        short = [s.token for s in engine.submit(ids, [], Sampling(0.0, max_tokens=3)).steps()]
        assert len(short) == 3
        made = long.out.qsize()                                    # steps made but never read
        assert made < 20 and not engine.rows
    finally:
        engine.close()


def test_a_failing_prefill_fails_its_request_alone(session):
    """An image for a text-only model is refused in its prefill; the answer beside it goes on."""
    engine = batch.Engine(session, max_batch=4)
    try:
        ids = session.tokenizer.encode("Hello there", bos=True)
        steps = engine.submit(ids, [], Sampling(0.0, max_tokens=30)).steps()
        first = next(steps)
        broken = engine.submit(ids, [torch.zeros(3, 28, 28)], GREEDY)
        with pytest.raises(InputError, match="text-only"):
            list(broken.steps())
        assert [first.token] + [s.token for s in steps] == alone(session, ids, Sampling(0.0, max_tokens=30), None)[0]
    finally:
        engine.close()


def test_a_prompt_over_max_len_is_refused_and_answers_end_there(session):
    engine = batch.Engine(session, max_batch=2, max_len=40)
    try:
        tok = session.tokenizer
        with pytest.raises(InputError, match="a sequence may take 40 positions here"):
            engine.submit(tok.encode("word " * 40, bos=True), [], GREEDY)
        ids = tok.encode("Hello", bos=True)
        assert len(list(engine.submit(ids, [], Sampling(0.0, max_tokens=1000)).steps())) == 40 - len(ids)
    finally:
        engine.close()


@pytest.mark.compile
def test_compiled_batched_steps_give_the_eager_answers(session):
    """--compile: the batched decoding step through torch.compile (one compilation for every batch size
    and length) gives the answers of the eager one."""
    asked = [(ids, Sampling(0.0, max_tokens=10), None) for ids, _, _ in requests(session)[:4]]
    eager = together(session, asked, max_batch=3)
    session.compile = True
    try:
        compiled = together(session, asked, max_batch=3)
    finally:
        session.compile = False
    assert [ids for ids, _ in compiled] == [ids for ids, _ in eager]
    difference = max((c - e).abs().max().item() for (_, c), (_, e) in zip(compiled, eager))
    print(f"\ncompiled vs eager batched steps: same tokens, logits max difference {difference:.1e}")
    assert difference < 1e-4
