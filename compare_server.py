"""Check a running OpenAI-compatible server (vLLM, llama-server, serve.py) against the reference.

    python compare_server.py http://localhost:8000 --model M --messages chat.json [--tools tools.json]

The conversation goes to the server at temperature 0 with logprobs and its top 20 alternatives; the
reference model then reads the same prompt followed by the server's tokens (teacher forcing), which
gives its own distribution at every generated position. Printed: whether the prompt ids agree (where
the server can tell them), then per generated position the top-1 agreement, the KL divergence
KL(server || reference) estimated from the server's top-k, the rank of the server's token under the
reference, and the first position where they part, with the text around it. Exit 1 on a difference.

The KL estimate merges every token outside the server's top-k into one bucket on both sides. Merging
outcomes never increases a KL divergence (the log-sum inequality), so it is a lower bound.
"""
import argparse
import base64
import json
import math
import mimetypes
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint import DEFAULT_MODEL
from generate import Session
from images import MAX_IMAGE_BYTES, file_url_path
from inputs import InputError, read_bytes, read_json
from load import DTYPES

TOP_LOGPROBS = 20   # the most OpenAI's API (and so most servers) give


def add_arguments(p) -> None:
    p.add_argument("url", help="the server's base URL, e.g. http://localhost:8000 (a trailing /v1 is fine)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the reference: local folder or hub id "
                                                          "(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--messages", help="a JSON file with the conversation (OpenAI chat format)")
    p.add_argument("--tools", help="a JSON file with a tool list in the OpenAI format")
    p.add_argument("--prompt", help="a user message, instead of --messages")
    p.add_argument("--image", action="append", default=[], help="with --prompt: an image path or URL (repeatable)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens the server generates (default: %(default)s)")
    p.add_argument("--served-model", help="the model id to ask for (default: the server's first in /v1/models)")
    p.add_argument("--max-kl", type=float, help="also a difference: a position whose KL estimate exceeds this")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server (default: %(default)s)")


# ----------------------------------------------------------------------------- the conversation

def conversation(args) -> tuple[list[dict], list | None]:
    if args.messages:
        messages = read_json(Path(args.messages), f"--messages {args.messages}")
    elif args.prompt is not None:
        content = [{"type": "text", "text": args.prompt}] + [
            {"type": "image_url", "image_url": {"url": image}} for image in args.image]
        messages = [{"role": "user", "content": content if args.image else args.prompt}]
    else:
        raise InputError("give the conversation: --messages FILE or --prompt TEXT")
    if not isinstance(messages, list):
        raise InputError(f"--messages {args.messages}: expected a JSON list of messages")
    tools = read_json(Path(args.tools), f"--tools {args.tools}") if args.tools else None
    return [inline_images(m) for m in messages], tools


def inline_images(message):
    """A message whose local image files (paths, file:// URLs) are data: URLs: the server cannot read
    our files, and both sides then decode the same bytes."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        url = part.get("image_url", {}).get("url") if isinstance(part, dict) and part.get("type") == "image_url" \
            and isinstance(part.get("image_url"), dict) else None
        if isinstance(url, str) and not url.startswith(("data:", "http://", "https://")):
            path = file_url_path(url) if url.startswith("file://") else Path(url)
            data = base64.b64encode(read_bytes(path, MAX_IMAGE_BYTES, f"image {url}")).decode()
            mime = mimetypes.guess_type(path.name)[0] or "image/png"
            part = {**part, "image_url": {**part["image_url"], "url": f"data:{mime};base64,{data}"}}
        parts.append(part)
    return {**message, "content": parts}


# ----------------------------------------------------------------------------- the server

def post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer EMPTY"})
    return read_response(request, timeout)


def get(url: str, timeout: float) -> dict:
    return read_response(urllib.request.Request(url, headers={"Authorization": "Bearer EMPTY"}), timeout)


def read_response(request: urllib.request.Request, timeout: float) -> dict:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise InputError(f"{request.full_url}: HTTP {e.code}: {e.read()[:500].decode(errors='replace')}") from None
    except (OSError, ValueError) as e:    # refused, timed out, not JSON
        raise InputError(f"{request.full_url}: {e}") from None


def server_prompt_ids(base: str, model: str, messages: list, tools, timeout: float) -> tuple[list[int] | None, str]:
    """The server's prompt ids, and how they were asked for: vLLM's and serve.py's /tokenize take the
    conversation; llama-server's /apply-template renders it and its /tokenize reads the text (parsing
    control tokens). (None, why) where neither answers."""
    try:
        found = post(f"{base}/tokenize", {"model": model, "messages": messages, "tools": tools}, timeout)
        if isinstance(found.get("tokens"), list):
            return found["tokens"], "/tokenize"
    except InputError:
        pass
    try:
        prompt = post(f"{base}/apply-template", {"messages": messages, "tools": tools}, timeout)["prompt"]
        found = post(f"{base}/tokenize", {"content": prompt, "add_special": False, "parse_special": True}, timeout)
        return found["tokens"], "/apply-template + /tokenize"
    except (InputError, KeyError, TypeError):
        return None, "the server tells neither (no /tokenize for messages, no /apply-template)"


class TokenIds:
    """The ids of the tokens a server names in its logprobs: an "id" key (llama-server), "token_id:N"
    (vLLM's return_tokens_as_token_ids, serve.py too), or else the token's bytes looked up."""

    def __init__(self, tokenizer):
        self.tokenizer, self.by_bytes = tokenizer, None

    def __call__(self, entry: dict) -> int:
        if isinstance(entry.get("id"), int):
            return entry["id"]
        token = entry.get("token", "")
        if token.startswith("token_id:"):
            return int(token[len("token_id:"):])
        try:
            return self.tokenizer.special_id(token)
        except InputError:
            pass
        if self.by_bytes is None:
            tok = self.tokenizer
            self.by_bytes = {tok.token_bytes(i): i for i in range(tok.n_words) if not tok.is_special(i)}
        data = bytes(entry.get("bytes") or token.encode())
        if data not in self.by_bytes:
            raise InputError(f"the server's token {token!r} is not a token of the reference's vocabulary")
        return self.by_bytes[data]


# ----------------------------------------------------------------------------- the comparison

@dataclass
class Position:
    server_id: int
    reference_top1: int
    rank: int                       # of the server's token under the reference (0: its top-1)
    server_logprob_ref: float       # the reference's logprob of the server's token
    top1_logprob_ref: float
    kl: float                       # lower bound of KL(server || reference), see the module docstring


@torch.inference_mode()
def reference_logprobs(model, prompt: list[int], images: list, generated: list[int]) -> torch.Tensor:
    """The reference's log-distributions [N, V] of each generated token, given the prompt and the
    generated tokens before it: the prompt prefilled, then the generated tokens in one chunk."""
    device = model.output.weight.device
    model.setup_cache(1, len(prompt) + len(generated))
    rows = [model(torch.tensor([prompt], device=device), input_pos=torch.arange(len(prompt), device=device),
                  images=images or None, last_only=True)[0]]                              # [1, V]
    if len(generated) > 1:
        positions = torch.arange(len(prompt), len(prompt) + len(generated) - 1, device=device)
        rows.append(model(torch.tensor([generated[:-1]], device=device), input_pos=positions)[0])  # [N - 1, V]
    return torch.cat(rows).double().log_softmax(-1).cpu()


def compare_position(server_id: int, server_top: dict[int, float], ref: torch.Tensor) -> Position:
    """One generated position: server_top maps ids to the server's logprobs (its top-k and its token),
    ref [V] is the reference's log-distribution."""
    ids = list(server_top)
    p = torch.tensor([math.exp(server_top[i]) for i in ids], dtype=torch.float64)
    q = ref[ids].exp()
    p_tail, q_tail = max(1 - p.sum().item(), 0.0), max(1 - q.sum().item(), 1e-300)
    kl = (p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log())).sum().item()
    kl += p_tail * math.log(p_tail / q_tail) if p_tail > 0 else 0.0
    top1 = int(ref.argmax())
    return Position(server_id, top1, int((ref > ref[server_id]).sum()), ref[server_id].item(), ref[top1].item(),
                    max(kl, 0.0))


def run(args) -> int:
    base = args.url.rstrip("/").removesuffix("/v1")
    messages, tools = conversation(args)
    session = Session(args.model, args.device, args.dtype)
    tokenizer = session.tokenizer
    prompt, images = session.encode(messages, tools)
    served = args.served_model or get(f"{base}/v1/models", args.timeout)["data"][0]["id"]

    theirs, how = server_prompt_ids(base, served, messages, tools, args.timeout)
    answer = post(f"{base}/v1/chat/completions", {
        "model": served, "messages": messages, "tools": tools, "temperature": 0, "max_tokens": args.max_tokens,
        "logprobs": True, "top_logprobs": TOP_LOGPROBS, "return_tokens_as_token_ids": True}, args.timeout)
    choice = answer["choices"][0]
    entries = (choice.get("logprobs") or {}).get("content") or []
    if not entries:
        raise InputError(f"{base}: the answer has no logprobs; the server must support logprobs/top_logprobs")
    token_id = TokenIds(tokenizer)
    generated = [token_id(e) for e in entries]
    # the server's known part of each distribution: its top-k and the token it chose
    tops = [{**{token_id(t): t["logprob"] for t in e.get("top_logprobs") or []}, i: e["logprob"]}
            for i, e in zip(generated, entries)]

    model = session.load()
    images = [im.to(model.output.weight.device, model.output.weight.dtype) for im in images]
    ref = reference_logprobs(model, prompt, images, generated)
    positions = [compare_position(i, top, row) for i, top, row in zip(generated, tops, ref)]
    return report(args, tokenizer, prompt, theirs, how, generated, positions, choice.get("finish_reason"))


def report(args, tokenizer, prompt, theirs, how, generated, positions: list[Position], finish) -> int:
    print(f"server              {args.url} ({len(generated)} tokens, finish_reason {finish})")
    prompt_differs = theirs is not None and theirs != prompt
    if theirs is None:
        print(f"prompt ids          not compared: {how}")
    elif not prompt_differs:
        print(f"prompt ids          equal ({len(prompt)} tokens, from {how})")
    else:
        at = next((k for k, (a, b) in enumerate(zip(prompt, theirs)) if a != b), min(len(prompt), len(theirs)))
        print(f"prompt ids          DIFFER at {at} of {len(prompt)} (theirs {len(theirs)}, from {how}): "
              f"reference {prompt[at:at + 5]} {tokenizer.decode(prompt[at:at + 5], special='keep')!r}, "
              f"server {theirs[at:at + 5]} {tokenizer.decode(theirs[at:at + 5], special='keep')!r}; "
              f"before: {tokenizer.decode(prompt[max(at - 10, 0):at], special='keep')!r}")
    agree = [p.rank == 0 for p in positions]
    kls = [p.kl for p in positions]
    print(f"top-1 agreement     {sum(agree) / len(agree):.6f} ({sum(agree)}/{len(agree)})")
    print(f"KL(server||ref)     mean {sum(kls) / len(kls):.3g}, max {max(kls):.3g} at position "
          f"{kls.index(max(kls))} (a lower bound: the tail beyond the server's top-{TOP_LOGPROBS} is one bucket)")
    print(f"rank under the ref  max {max(p.rank for p in positions)} (0: the reference's top-1)")
    first = agree.index(False) if False in agree else None
    if first is None:
        print("first difference    none")
    else:
        p, keep = positions[first], lambda ids: tokenizer.decode(ids, special="keep")
        print(f"first difference    position {first}: server {p.server_id} {keep([p.server_id])!r} (reference rank "
              f"{p.rank}, logprob {p.server_logprob_ref:.4f}), reference top-1 {p.reference_top1} "
              f"{keep([p.reference_top1])!r} (logprob {p.top1_logprob_ref:.4f}), KL there {p.kl:.3g}")
        print(f"context             ...{keep(generated[max(first - 20, 0):first])!r} then server "
              f"{keep([p.server_id])!r} / reference {keep([p.reference_top1])!r}")
    too_far = args.max_kl is not None and max(kls) > args.max_kl
    if too_far:
        print(f"KL above --max-kl   {max(kls):.3g} > {args.max_kl}")
    return 1 if prompt_differs or first is not None or too_far else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except InputError as e:   # bad input or an unreachable server: one line; a bug keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
