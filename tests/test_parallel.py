"""Tensor parallel (parallel.py) on the CPU: 2 processes over gloo, set up as torchrun sets them up,
against the single-process model: logits, tokens, each rank's share of the weights and the cache, the
command line, negative controls. One spawn runs every check (a launch costs seconds of imports).

The tiny checkpoint keeps the awkward parts: GQA 8 query heads over 2 kv heads (1 kv head per rank),
head_dim 8 != 48 / 8, an untied output head, a vision tower (replicated)."""
import contextlib
import io
import logging
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import RowwiseParallel

import generate
import parallel
from checkpoints import (TINY_PARAMS, TINY_VISION_PARAMS, forward_in_chunks, hf_mistral3_config, image_tokens,
                         native_to_hf_mistral3, write_native)
from generate import Sampling
from inputs import InputError
from load import load_model
from model import ModelArgs
from tekken_files import write_tekken

WORLD = 2
TOL = 1e-5
PARAMS = {**TINY_VISION_PARAMS, "vocab_size": 131072, "max_position_embeddings": 600}   # tekken's vocabulary
ODD_PARAMS = {**TINY_PARAMS, "n_heads": 6, "n_kv_heads": 3}                             # 3 kv heads: not over 2
SPLIT = {"attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "feed_forward.w1": 0, "feed_forward.w3": 0,
         "attention.wo": 1, "feed_forward.w2": 1}                                        # the dim each is split on

_g = torch.Generator().manual_seed(0)
PIXELS = torch.randn(3, 56, 84, generator=_g)                                            # 2 x 3 image tokens
TEXT = [1, 3, 500, 501, 502, 503, 504, 505, 4, 600, 601, 602]
WITH_IMAGE = [1, 3] + image_tokens(2, 3) + [700, 701, 4, 702, 703, 704]
CASES = {"text": (TEXT, []), "image": (WITH_IMAGE, [PIXELS])}
DECODE_STEPS = 3   # the last 3 tokens of each case go through the cache one at a time, after a prefill


def cli_args(folder: Path, image: Path, dump: Path) -> list[str]:
    return ["--model", str(folder), "--image", str(image), "--temperature", "0", "--dtype", "float32",
            "--max-tokens", "4", "--system", "", "--dump", str(dump), "What is in this image?"]


@torch.no_grad()
def logits(model, case: str) -> torch.Tensor:
    """The logits [1, S, V] of a case: a prefill, then decoding steps through the cache."""
    ids, images = CASES[case]
    n = len(ids)
    ends = [n - DECODE_STEPS] + list(range(n - DECODE_STEPS + 1, n + 1))
    return forward_in_chunks(model, torch.tensor([ids]), ends, [images or None] + [None] * DECODE_STEPS)


def run_model(model) -> dict:
    """What both sides compute with a loaded model: the logits of each case, greedy tokens, tokens
    sampled from a seed."""
    out = {case: logits(model, case) for case in CASES}
    for case, (ids, images) in CASES.items():
        out[case + " greedy"] = generate.generate(model, ids, images, 4, Sampling(0.0), set())[0]
    out["sampled"] = generate.generate(model, TEXT, [], 4, Sampling(1.0), set(), seed=5)[0]
    return out


def local_tensors(model) -> dict:
    """Per parameter: whether it is split, its local shape, its bytes and those of its storage."""
    found = {}
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        found[name] = (isinstance(p, DTensor), tuple(local.shape), local.nbytes,
                       local.untyped_storage().nbytes())
    return found


def _split_dim(name: str) -> int | None:
    """The dim that the plan splits parameter `name` on; None for a replicated one."""
    if not name.startswith("layers."):
        return None   # the vision tower (vision_encoder.transformer.layers...) too
    return next((dim for module, dim in SPLIT.items() if f".{module}." in name), None)


# ----------------------------------------------------------------------------- the two processes

def _rank_main(rank: int, port: int, out: Path, check, args):
    """One rank as torchrun would start it (its environment), running `check`, saving what it returns."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)   # two processes on a machine of few cores
    try:
        torch.save(check(*args), out / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def on_two_ranks(check, *args, tmp: Path, timeout: float = 120) -> list[dict]:
    """check(*args) on each of 2 spawned processes; what each returned."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_rank_main, (port, tmp, check, args), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):   # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {timeout} s")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def check_everything(folders: dict, out: Path) -> dict:
    """The checks of one rank; the test compares what it returns."""
    mesh, _ = parallel.mesh_from_env(torch.device("cpu"))
    rank = mesh.get_local_rank()
    found = {}

    model = load_model(folders["native"], mesh=mesh)
    found["params"] = local_tensors(model)
    found["wq.0"] = model.layers[0].attention.wq.weight.to_local().clone()
    found["w2.0"] = model.layers[0].feed_forward.w2.weight.to_local().clone()
    model.setup_cache(1, 64)
    found["cache bytes"] = sum(layer.attention.cache.k.nbytes + layer.attention.cache.v.nbytes
                               for layer in model.layers)
    found.update(run_model(model))
    found["unseeded"] = generate.generate(model, TEXT, [], 4, Sampling(1.0), set())[0]
    del model

    found["hf"] = logits(load_model(folders["hf"], mesh=mesh), "image")

    # Negative controls. RowwiseParallel on wq splits its input columns: the attention cannot even run.
    plan, log = parallel.LAYER_PLAN, logging.getLogger("torch._subclasses.fake_tensor")
    try:
        parallel.LAYER_PLAN = {**plan, "attention.wq": RowwiseParallel()}
        log.disabled = True   # it logs the failure below at length
        try:
            logits(load_model(folders["native"], mesh=mesh), "text")
            found["rowwise wq"] = "ran"
        except RuntimeError as e:
            found["rowwise wq"] = f"raised {e}"
        # wk and wv left whole: each rank's query heads meet every kv head, not their own.
        parallel.LAYER_PLAN = {k: v for k, v in plan.items() if k not in ("attention.wk", "attention.wv")}
        found["whole kv"] = logits(load_model(folders["native"], mesh=mesh), "text")
    finally:
        parallel.LAYER_PLAN, log.disabled = plan, False

    try:
        load_model(folders["odd"], mesh=mesh)
    except InputError as e:
        found["odd load"] = str(e)
    found["odd cli"] = _main(["--model", str(folders["odd"]), "hi"])

    found["cli"] = _main(cli_args(folders["native"], folders["image"], out / f"dump{rank}.safetensors"))
    return found


def _main(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = generate.main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


# ----------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    native = tmp_path_factory.mktemp("Mistral-Small-3.2-24B-Instruct-2506")
    weights = write_native(native, PARAMS, seed=3)
    write_tekken(native, "v11")
    image = native / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(image)
    hf = tmp_path_factory.mktemp("hf")
    save_file(native_to_hf_mistral3(weights, PARAMS), hf / "model.safetensors")
    (hf / "config.json").write_text(hf_mistral3_config(PARAMS).to_json_string())
    odd = tmp_path_factory.mktemp("odd")
    write_native(odd, ODD_PARAMS)
    write_tekken(odd, "v11")
    return {"native": native, "hf": hf, "odd": odd, "image": image}


@pytest.fixture(scope="module")
def single(folders, tmp_path_factory) -> dict:
    """The same computations in this one process, unsplit."""
    model = load_model(folders["native"])
    found = run_model(model)
    found["params"] = local_tensors(model)
    found["weights"] = dict(model.named_parameters())
    model.setup_cache(1, 64)
    found["cache bytes"] = sum(layer.attention.cache.k.nbytes + layer.attention.cache.v.nbytes
                               for layer in model.layers)
    found["dump"] = tmp_path_factory.mktemp("single") / "dump.safetensors"
    found["cli"] = _main(cli_args(folders["native"], folders["image"], found["dump"]))
    return found


@pytest.fixture(scope="module")
def ranks(folders, single, tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("ranks")
    start = time.perf_counter()
    found = on_two_ranks(check_everything, folders, out, tmp=out)
    print(f"{WORLD} ranks: {time.perf_counter() - start:.1f} s")
    return found, out


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_split_logits_equal_single_process(single, ranks, case):
    """A prefill then decoding steps through each rank's share of the cache: the logits of the
    single process, and its greedy tokens."""
    for rank, found in enumerate(ranks[0]):
        diff = max_diff(found[case], single[case])
        print(f"{case}, rank {rank}: prefill + {DECODE_STEPS} decode steps, max abs diff {diff:.2e}")
        assert diff <= TOL
        assert found[case + " greedy"] == single[case + " greedy"]


def test_every_rank_samples_the_same_tokens(single, ranks):
    """From --seed: the single process's tokens; without one, rank 0's seed, shared."""
    for found in ranks[0]:
        assert found["sampled"] == single["sampled"]
    assert ranks[0][0]["unseeded"] == ranks[0][1]["unseeded"]


def test_hugging_face_layout_split_in_native_row_order(single, ranks):
    """Each rank's rows of the permuted wq / wk, un-permuted per head, are its heads' native rows."""
    for found in ranks[0]:
        diff = max_diff(found["hf"], single["image"])
        print(f"Hugging Face layout over {WORLD} ranks vs native single process: max abs diff {diff:.2e}")
        assert diff <= TOL


def test_each_rank_holds_its_share(single, ranks):
    """From the tensors' local shapes: a split weight is 1/N of the whole on the plan's dim, in memory
    of its own (not a view of the whole), rank r's is the r-th slice; the rest is whole; the cache is 1/N."""
    whole = single["params"]
    split_bytes = sum(nbytes for name, (_, _, nbytes, _) in whole.items() if _split_dim(name) is not None)
    for rank, found in enumerate(ranks[0]):
        assert found["params"].keys() == whole.keys()
        for name, (is_split, shape, nbytes, storage) in found["params"].items():
            dim = _split_dim(name)
            assert is_split == (dim is not None), name
            expected = list(whole[name][1])
            if dim is not None:
                expected[dim] //= WORLD
                assert storage == nbytes, name
            assert shape == tuple(expected), name
        held = sum(nbytes for _, _, nbytes, _ in found["params"].values())
        total = sum(nbytes for _, _, nbytes, _ in whole.values())
        assert held == total - split_bytes + split_bytes // WORLD
        assert found["cache bytes"] * WORLD == single["cache bytes"]
        weights = single["weights"]
        assert torch.equal(found["wq.0"], weights["layers.0.attention.wq.weight"].chunk(WORLD, 0)[rank])
        assert torch.equal(found["w2.0"], weights["layers.0.feed_forward.w2.weight"].chunk(WORLD, 1)[rank])
        print(f"rank {rank}: parameters {held} bytes of {total} ({split_bytes // WORLD} of the split "
              f"{split_bytes}, {total - split_bytes} replicated); KV cache {found['cache bytes']} bytes "
              f"of {single['cache bytes']}")


def test_negative_controls_wrong_plans(single, ranks):
    for found in ranks[0]:
        assert found["rowwise wq"].startswith("raised")   # RowwiseParallel on wq does not run
        print(f"RowwiseParallel on wq: {found['rowwise wq'].splitlines()[0]}")
        diff = max_diff(found["whole kv"], single["text"])
        print(f"wk, wv not split: max abs diff {diff:.2e}")
        assert diff > 1e-2


def test_a_count_that_does_not_divide_the_heads_is_refused(ranks):
    message = ("tensor parallel over 2 processes: 2 does not divide the model's 3 kv heads; the process count "
               "must divide them (1, 3)")
    for rank, found in enumerate(ranks[0]):
        assert found["odd load"] == message
        code, stdout, stderr = found["odd cli"]
        assert code == 2 and stdout == ""
        assert stderr == (f"error: {message}\n" if rank == 0 else "")   # one line, from rank 0


def test_check_split_without_processes():
    with pytest.raises(InputError, match="3 does not divide the model's 8 query heads, 2 kv heads;"):
        parallel.check_split(ModelArgs(**TINY_PARAMS), 3)


def test_command_line_only_rank_0_prints_and_writes(single, ranks):
    """torchrun generate.py: rank 0 streams the single process's answer, its stats line, its dump."""
    found, out = ranks
    code, stdout, stderr = found[0]["cli"]
    assert code == 0 and stdout == single["cli"][1] and "prompt tokens" in stderr
    assert found[1]["cli"] == (0, "", "")
    assert not (out / "dump1.safetensors").exists()
    ours, theirs = load_file(out / "dump0.safetensors"), load_file(single["dump"])
    assert torch.equal(ours["generated_ids"], theirs["generated_ids"])
    diff = max_diff(ours["logits"], theirs["logits"])
    print(f"command line dump over {WORLD} ranks vs single process: max abs diff {diff:.2e}")
    assert diff <= TOL


# ----------------------------------------------------------------------------- torch.compile (opt-in)

def check_compiled(folder: Path) -> dict:
    mesh, _ = parallel.mesh_from_env(torch.device("cpu"))
    model = load_model(folder, mesh=mesh)
    found = {"eager": generate.generate(model, TEXT, [], 4, Sampling(0.0), set())[0],
             "compiled": generate.generate(model, TEXT, [], 4, Sampling(0.0), set(), compile=True)[0]}
    # One step again, on the cache as generate left it: the compiled step's logits and the eager one's.
    token, pos = torch.tensor([found["compiled"][:1]]), torch.tensor([len(TEXT)])
    with torch.inference_mode():
        found["step diff"] = max_diff(generate.compiled_decode_step("cpu")(model, token, pos),
                                      generate.decode_step(model, token, pos))
    return found


@pytest.mark.compile
def test_compiled_decoding_step_under_tensor_parallel(folders, single, tmp_path):
    for found in on_two_ranks(check_compiled, folders["native"], tmp=tmp_path, timeout=300):
        print(f"compiled vs eager decoding step over {WORLD} ranks: max abs diff {found['step diff']:.2e}")
        assert found["compiled"] == found["eager"] == single["text greedy"]
        assert found["step diff"] <= TOL
