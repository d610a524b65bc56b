"""Tensor parallel: the text layers split over the N processes that torchrun starts, one GPU each.

    torchrun --nproc_per_node=2 generate.py "Why is the sky blue?"

PyTorch's own engine does the work (DTensor and torch.distributed.tensor.parallel, as torchtitan
does): the plain Megatron plan on every text block, applied from outside the model, which keeps its
code. In each block, wq, wk, wv, w1 and w3 are split by output rows (ColwiseParallel): each rank
holds whole heads, H/N query heads and K/N kv heads (and their share of the KV cache, sized in
model.setup_cache from the local rows of wk), and 1/N of the feed-forward width. wo and w2 are
split by input columns (RowwiseParallel): their partial products are summed by one all-reduce each,
two per block. Everything else, the embedding, the output head, the norms and the vision tower,
is replicated: every rank computes the same logits and, from the same seed, samples the same token.

The model is built on the meta device and parallelized there; load.py then reads, from the
memory-mapped safetensors, only each rank's slices of the split weights (shard_region).
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from inputs import InputError

# Per text block. The colwise outputs are plain local tensors (use_local_output, the default), so the
# attention sees [B, S, H/N * Dh] and reshapes it to its H/N local heads with its -1.
LAYER_PLAN = {
    "attention.wq": ColwiseParallel(),
    "attention.wk": ColwiseParallel(),
    "attention.wv": ColwiseParallel(),
    "attention.wo": RowwiseParallel(),
    "feed_forward.w1": ColwiseParallel(),
    "feed_forward.w3": ColwiseParallel(),
    "feed_forward.w2": RowwiseParallel(),
}


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun), known before the process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return world_size() > 1


def is_lead() -> bool:
    """Rank 0 (or the only process): the one that prints, streams and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def mesh_from_env(device: torch.device) -> tuple[DeviceMesh | None, torch.device]:
    """(None, device) for a single process. Under torchrun: the process group (NCCL on GPUs, gloo on
    the CPU; made once) as a 1-D mesh over the WORLD_SIZE ranks, and this rank's device, the GPU
    LOCAL_RANK; every rank's random generator is then seeded alike (_share_seed)."""
    if not launched():
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise InputError(f"device={device.type!r}: tensor parallel runs on cuda (NCCL) or cpu (gloo)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _share_seed(device)
    return init_device_mesh(device.type, (dist.get_world_size(),)), device


def _share_seed(device: torch.device) -> None:
    """Seed every rank's global generator with rank 0's seed: unseeded sampling (no --seed) then draws
    the same tokens on every rank, as it must, since every rank runs the same loop on the same logits."""
    seed = torch.tensor([torch.initial_seed() % 2**62], device=device)
    dist.broadcast(seed, src=0)
    torch.manual_seed(int(seed))


def close() -> None:
    """End the process group, if there is one (NCCL warns at exit otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def check_split(args, n: int) -> None:
    """Each rank holds whole query heads, whole kv heads and an equal part of the feed-forward width."""
    sizes = {"query heads": args.n_heads, "kv heads": args.n_kv_heads, "feed-forward width": args.hidden_dim}
    bad = [f"{size} {what}" for what, size in sizes.items() if size % n]
    if bad:
        fits = [str(d) for d in range(1, args.n_kv_heads + 1) if all(size % d == 0 for size in sizes.values())]
        raise InputError(f"tensor parallel over {n} processes: {n} does not divide the model's "
                         f"{', '.join(bad)}; the process count must divide them ({', '.join(fits)})")


def parallelize(model, mesh: DeviceMesh) -> None:
    """Split every text block of `model` over `mesh` with LAYER_PLAN (load.py does it on the meta
    device, before any weight is read); the vision tower, the embedding and the output head stay
    replicated."""
    check_split(model.args, mesh.size())
    for layer in model.layers:
        parallelize_module(layer, mesh, LAYER_PLAN)


def shard_region(param: torch.Tensor) -> tuple[int, int, int] | None:
    """The part of the full tensor that this rank holds of a split parameter, (dim, start, length) as
    for Tensor.narrow, from the parameter's placement and local shape (splits are even: check_split);
    None for a replicated one."""
    if not isinstance(param, DTensor) or param.placements[0].is_replicate():
        return None
    dim = param.placements[0].dim
    length = param.to_local().shape[dim]
    return dim, param.device_mesh.get_local_rank() * length, length


def as_shard(local: torch.Tensor, like: DTensor) -> DTensor:
    """This rank's slice `local` as the split parameter `like` (same mesh, placement, global shape)."""
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())
