"""Check a running OpenAI-compatible server (vLLM, llama-server, mlx_lm.server, serve.py) against the reference.

    python compare_server.py http://localhost:8000 --model M --messages chat.json [--tools tools.json]
    python compare_server.py http://localhost:8000 --model M --prompt "What is this?" [--system S] [--image p.png]
    python compare_server.py http://localhost:8000 --model M --suite          # the conformance battery

A conversation goes to the server at temperature 0 with logprobs and its top 20 alternatives (fewer when the
server allows fewer: it is said); the reference then reads the same prompt followed by the server's tokens
(teacher forcing), which gives its own distribution at every generated position. The verdict names the first
of four layers where the server departs from the reference:

  prompt    the prompt ids (template, control tokens, image grids): from the answer's prompt_token_ids
            (vLLM's return_token_ids), /tokenize with the messages (vLLM, serve.py), /apply-template then
            /tokenize with control tokens parsed (llama-server, text only), or else the answer's
            usage.prompt_tokens against the reference's count (mlx_lm.server), each named as such;
  model     the distribution on the same context: the server's top-1 against the reference's (a near-tie
            within --tie nats is no difference), and the KL divergence KL(server || reference);
  decoding  at temperature 0 the server takes its own top-1, and stops where </s> is the reference's top-1;
  parsing   the content and tool calls the server returns against the reference's parse of its tokens.

The server's tokens: the ids it names ("token_id:N", an "id" key, or the bytes looked up), unless their
text is not the text the server answered (mlx_lm.server names the first of its alternatives, not the token
it chose): then each token is the alternative whose text continues the answer. A server that holds back a
token ending inside a UTF-8 character (llama-server) sends one entry for both: the held-back text is
re-tokenized as the reference would have generated it, and its positions carry no server logprobs.

The KL estimate merges every token outside the server's top-k into one bucket on both sides. Merging
outcomes never increases a KL divergence (the log-sum inequality), so it is a lower bound.
"""
import argparse
import base64
import codecs
import io
import json
import math
import mimetypes
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from chat import AssistantOutput, optional_special, parse_output
from chat_template import WEATHER, assistant, call, diagnose, first_difference, result, system, text, user
from generate import Session, add_model_flags, as_flags
from images import MAX_IMAGE_BYTES, file_url_path
from inputs import InputError, read_bytes, read_json

TOP_LOGPROBS = 20   # the most OpenAI's API (and so most servers) give
FALLBACK_TOP = (10, 5, 1, 0)   # asked in turn when a server refuses a count and does not say its limit
TIE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}   # default --tie: rounding noise of the reference
LAYERS = ("prompt", "model", "decoding", "parsing")


def add_arguments(p) -> None:
    p.add_argument("url", help="the server's base URL, e.g. http://localhost:8000 (a trailing /v1 is fine)")
    add_model_flags(p, compile=False, quant_math=False)   # the reference: a GGUF's exact path
    p.add_argument("--messages", help="a JSON file with the conversation (OpenAI chat format)")
    p.add_argument("--tools", help="a JSON file with a tool list in the OpenAI format")
    p.add_argument("--prompt", help="a user message, instead of --messages")
    p.add_argument("--system", help="with --prompt: a system message before it")
    p.add_argument("--image", action="append", default=[], help="with --prompt: an image path or URL (repeatable)")
    p.add_argument("--suite", action="store_true", help="run the conformance battery: one verdict per case")
    p.add_argument("--cases", help="with --suite: the cases to run, comma-separated (default: all)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens the server generates (default: %(default)s)")
    p.add_argument("--served-model", help="the model id to ask for (default: the server's first in /v1/models)")
    p.add_argument("--max-kl", type=float, help="also a model difference: a position whose KL estimate exceeds this")
    p.add_argument("--tie", type=float, help="a top-1 that differs by less than this many nats is a near-tie, "
                                             "not a difference (default: 0.001 in float32, 0.05 in 16 bits)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server (default: %(default)s)")


# ----------------------------------------------------------------------------- the conversation

def conversation(args) -> tuple[list[dict], list | None]:
    if args.messages:
        messages = read_json(Path(args.messages), f"--messages {args.messages}")
    elif args.prompt is not None:
        content = [{"type": "text", "text": args.prompt}] + [
            {"type": "image_url", "image_url": {"url": image}} for image in args.image]
        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        messages.append({"role": "user", "content": content if args.image else args.prompt})
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


def has_images(messages: list) -> bool:
    return any(isinstance(m, dict) and isinstance(m.get("content"), list) and
               any(isinstance(p, dict) and p.get("type") in ("image_url", "image") for p in m["content"])
               for m in messages)


# ----------------------------------------------------------------------------- the server

class Refused(InputError):
    """The server answered with an HTTP error: its status and what it said."""

    def __init__(self, url: str, status: int, said: str):
        super().__init__(f"{url}: HTTP {status}: {said}")
        self.status, self.said = status, said


def request(url: str, body: dict | None = None) -> urllib.request.Request:
    headers = {"Authorization": "Bearer EMPTY"}
    if body is None:
        return urllib.request.Request(url, headers=headers)
    return urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                  headers={**headers, "Content-Type": "application/json"})


def post(url: str, body: dict, timeout: float) -> dict:
    return read_response(request(url, body), timeout)


def get(url: str, timeout: float) -> dict:
    return read_response(request(url), timeout)


def read_response(req: urllib.request.Request, timeout: float, stream: bool = False):
    """The JSON answer, or with stream the list of server-sent events' JSON ([DONE] ends it)."""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            if not stream:
                return json.loads(response.read())
            events = []
            for line in response:
                data = line.strip().removeprefix(b"data:").strip() if line.startswith(b"data:") else None
                if data == b"[DONE]":
                    break
                if data:
                    events.append(json.loads(data))
            return events
    except urllib.error.HTTPError as e:
        raise Refused(req.full_url, e.code, e.read()[:500].decode(errors="replace")) from None
    except (OSError, ValueError) as e:    # refused, timed out, not JSON
        raise InputError(f"{req.full_url}: {e}") from None


@dataclass
class Answer:
    """What the server answered, streamed or not."""
    content: str
    tool_calls: list[dict]           # [{"name", "arguments"}] in order
    reasoning: str | None            # reasoning_content / reasoning, where the server splits it off
    finish: str | None
    entries: list[dict]              # logprobs.content
    usage: dict
    prompt_ids: list[int] | None     # vLLM's return_token_ids
    token_ids: list[int] | None


def read_answer(body: dict) -> Answer:
    choice = body["choices"][0]
    message = choice.get("message") or {}
    calls = [{"name": c["function"].get("name"), "arguments": c["function"].get("arguments")}
             for c in message.get("tool_calls") or []]
    return Answer(message.get("content") or "", calls, reasoning_field(message), choice.get("finish_reason"),
                  (choice.get("logprobs") or {}).get("content") or [], body.get("usage") or {},
                  body.get("prompt_token_ids"), choice.get("token_ids"))


def read_stream(events: list[dict]) -> Answer:
    """The answer of a stream: deltas joined, tool-call deltas joined by index."""
    content, reasoning, calls, finish, usage, entries = "", None, {}, None, {}, []
    for event in events:
        if "error" in event:
            raise InputError(f"the server's stream ended with an error: {json.dumps(event['error'])[:300]}")
        usage = event.get("usage") or usage
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            content += delta.get("content") or ""
            if reasoning_field(delta) is not None:
                reasoning = (reasoning or "") + reasoning_field(delta)
            for d in delta.get("tool_calls") or []:
                one = calls.setdefault(d.get("index", len(calls)), {"name": None, "arguments": ""})
                function = d.get("function") or {}
                one["name"] = one["name"] or function.get("name")
                one["arguments"] += function.get("arguments") or ""
            entries += (choice.get("logprobs") or {}).get("content") or []
            finish = choice.get("finish_reason") or finish
    return Answer(content, [calls[k] for k in sorted(calls)], reasoning, finish, entries, usage, None, None)


def reasoning_field(message: dict) -> str | None:
    """The thinking a server splits off the content (vLLM: reasoning_content, newer: reasoning)."""
    found = message.get("reasoning_content", message.get("reasoning"))
    return found if isinstance(found, str) else None


class Server:
    """An OpenAI-compatible server as this tool talks to it: the model id it is asked for, how many
    alternatives per token it allows (negotiated on the first refusal), and what it was found to do."""

    def __init__(self, url: str, timeout: float, model: str | None = None):
        self.url, self.base, self.timeout = url, url.rstrip("/").removesuffix("/v1"), timeout
        self.top, self.notes = TOP_LOGPROBS, []
        self.model = model or self.first_model()

    def first_model(self) -> str | None:
        try:
            return get(f"{self.base}/v1/models", self.timeout)["data"][0]["id"]
        except (InputError, KeyError, IndexError, TypeError) as e:
            self.notes.append(f"no model id asked for: /v1/models lists none ({str(e)[:80] or 'empty'})")
            return None

    def chat(self, messages: list, tools: list | None, max_tokens: int, stream: bool = False) -> Answer:
        """The answer at temperature 0: with logprobs (top-k negotiated), or streamed without."""
        body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens}
        body.update({"model": self.model} if self.model else {})
        body.update({"tools": tools} if tools else {})
        if stream:
            events = read_response(request(f"{self.base}/v1/chat/completions", {
                **body, "stream": True, "stream_options": {"include_usage": True}}), self.timeout, stream=True)
            return read_stream(events)
        while True:
            try:
                return read_answer(post(f"{self.base}/v1/chat/completions", {
                    **body, "logprobs": True, "top_logprobs": self.top, "return_tokens_as_token_ids": True,
                    "return_token_ids": True}, self.timeout))
            except Refused as e:
                if e.status != 400 or "top_logprobs" not in e.said or self.top == 0:
                    raise
                asked, self.top = self.top, allowed_top(e.said, self.top)
                self.notes.append(f"top_logprobs: asked {asked}, the server refused ({e.said.strip()[:80]}); "
                                  f"asking {self.top}")

    def prompt_ids(self, messages: list, tools: list | None, answer: Answer) -> tuple[list[int] | None, str]:
        """The server's prompt ids and the route they came by; (None, why) where it tells none."""
        if valid_ids(answer.prompt_ids):
            return answer.prompt_ids, "the answer's prompt_token_ids"
        try:
            found = post(f"{self.base}/tokenize", {"model": self.model, "messages": messages, "tools": tools},
                         self.timeout).get("tokens")
            if valid_ids(found):
                return found, "/tokenize (messages)"
        except (InputError, AttributeError):
            pass
        if has_images(messages):   # the template writes an image as a marker, the grid comes later
            return None, "no /tokenize for messages, and /apply-template writes no image grid"
        try:
            prompt = post(f"{self.base}/apply-template", {"messages": messages, "tools": tools}, self.timeout)["prompt"]
            found = post(f"{self.base}/tokenize", {"content": prompt, "add_special": True, "parse_special": True},
                         self.timeout)["tokens"]
            if valid_ids(found):
                return found, "/apply-template + /tokenize"
        except (InputError, KeyError, TypeError):
            pass
        return None, "no /tokenize for messages, no /apply-template"


def allowed_top(said: str, asked: int) -> int:
    """The top_logprobs to ask after a refusal: the largest smaller count the message names, or the next
    of FALLBACK_TOP."""
    named = [int(n) for n in re.findall(r"\d+", said) if 0 <= int(n) < asked]
    return max(named) if named else next(n for n in FALLBACK_TOP if n < asked)


def valid_ids(ids) -> bool:
    return isinstance(ids, list) and len(ids) > 0 and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)


# ----------------------------------------------------------------------------- the server's tokens

class TokenIds:
    """The ids of the tokens a server names in its logprobs: an "id" key (llama-server, mlx_lm.server),
    "token_id:N" (vLLM's return_tokens_as_token_ids, serve.py too), or else the token's bytes looked up."""

    def __init__(self, tokenizer):
        self.tokenizer, self._by_bytes = tokenizer, None

    @property
    def by_bytes(self) -> dict[bytes, int]:
        if self._by_bytes is None:
            tok = self.tokenizer
            self._by_bytes = {tok.token_bytes(i): i for i in range(tok.n_words) if not tok.is_special(i)}
        return self._by_bytes

    def __call__(self, entry: dict) -> int:
        found = entry.get("id")
        token = entry.get("token") if isinstance(entry.get("token"), str) else ""
        if re.fullmatch(r"token_id:[0-9]{1,9}", token):
            found = int(token[len("token_id:"):])
        if isinstance(found, int) and not isinstance(found, bool):
            if not 0 <= found < self.tokenizer.n_words:
                raise InputError(f"the server's token id {found} is outside the reference's vocabulary")
            return found
        try:
            return self.tokenizer.special_id(token)
        except InputError:
            pass
        data = bytes(entry.get("bytes") or token.encode())
        if data not in self.by_bytes:
            raise InputError(f"the server's token {token!r} is not a token of the reference's vocabulary")
        return self.by_bytes[data]

    def maybe(self, entry: dict) -> int | None:
        try:
            return self(entry)
        except (InputError, ValueError, TypeError):
            return None

    def top(self, entry: dict) -> dict[int, float]:
        """The server's known part of a position's distribution: id -> logprob of its alternatives and of the
        token the entry names."""
        known = {}
        for t in (entry.get("top_logprobs") or []) + [entry]:
            i = self.maybe(t)
            if i is not None and isinstance(t.get("logprob"), (int, float)):
                known[i] = float(t["logprob"])
        return known


@dataclass
class Token:
    id: int | None          # None: held back by the server; known by its text alone (one token or more)
    held: bytes = b""       # the text of held-back tokens
    entry: dict | None = None   # the logprobs entry of its position; None where the server sent none


@dataclass
class Tokens:
    tokens: list[Token]
    how: str                    # how they were identified, in words
    problem: str | None = None  # why they could not be (then `tokens` is empty)


def identify(token_id: TokenIds, answer: Answer) -> Tokens:
    """The server's generated tokens: the ids it names where their text is the text it answered, or where each
    is its entry's most likely alternative (at temperature 0, the tokens of a server that names them right: a
    text that differs is then the parsing layer's business); else the alternatives that spell its text; else
    its ids unchecked (said so)."""
    if valid_ids(answer.token_ids) and len(answer.token_ids) == len(answer.entries):
        return Tokens([Token(i, entry=e) for i, e in zip(answer.token_ids, answer.entries)], "the answer's token_ids")
    tokens, held = named_tokens(token_id, answer.entries)
    text = shown_text(answer)
    held = f"; {held} held back inside UTF-8 characters, re-tokenized" if held else ""
    if tokens is not None and squeezed(text) == squeezed(token_text(token_id.tokenizer, tokens)):
        return Tokens(tokens, "the ids the server names" + held)
    if tokens is not None and all(top and t.id == max(top, key=top.get) for t in tokens if t.entry is not None
                                  for top in [token_id.top(t.entry)]):
        return Tokens(tokens, "the ids the server names, each its top-1, their text not the answer's" + held)
    found = tokens_by_text(token_id, answer.entries, text)
    wrong = None if found is None else next(
        (k for k, (t, e) in enumerate(zip(found, answer.entries)) if t.id != token_id.maybe(e)), None)
    if found is not None and wrong is None:
        return Tokens(found, "the ids the server names (their text checked one by one)")
    if found is not None:
        return Tokens(found, f"by their text: the entries' ids are not the answer's tokens (entry {wrong} names "
                             f"{shown(token_id, token_id.maybe(answer.entries[wrong]))}, its text is "
                             f"{shown(token_id, found[wrong].id)})")
    if tokens is not None:
        return Tokens(tokens, "the ids the server names, unchecked: neither they nor the alternatives spell its "
                              "answer" + held)
    return Tokens([], "", "its logprobs do not spell its answer: no token of an entry's alternatives continues "
                          "the text, and the entries name no token of the reference's vocabulary")


def shown_text(answer: Answer) -> str:
    """The text a server shows for its tokens: the thought it split off (reasoning models), the content,
    then each call's name and arguments (what the v11 layout writes after [TOOL_CALLS] and [ARGS])."""
    calls = "".join((c["name"] or "") + (c["arguments"] if isinstance(c["arguments"], str) else
                                         json.dumps(c["arguments"], ensure_ascii=False)) for c in answer.tool_calls)
    return (answer.reasoning or "") + answer.content + calls


def squeezed(text: str | bytes) -> str:
    """Text without whitespace and replacement characters: what must match for a server's ids to be the
    tokens of its answer (servers strip whitespace, and count replacement characters differently)."""
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    return re.sub(r"[\s\ufffd]+", "", text)


def replaced(text: str) -> str:
    """Text with each run of replacement characters as one: how many an invalid UTF-8 sequence becomes is
    a convention that servers do not share."""
    return re.sub("\ufffd+", "\ufffd", text)


def shown(token_id: TokenIds, i: int | None) -> str:
    return "nothing" if i is None else f"{i} {token_id.tokenizer.decode([i], special='keep')!r}"


def named_tokens(token_id: TokenIds, entries: list[dict]) -> tuple[list[Token] | None, int]:
    """Tokens from the ids the entries name; an entry whose bytes are more than its token's carries the
    tokens the server held back before it. (None, 0) where an entry names no known token."""
    tok, tokens, held = token_id.tokenizer, [], 0
    for entry in entries:
        i = token_id.maybe(entry)
        if i is None:
            return None, 0
        sent = bytes(entry["bytes"]) if isinstance(entry.get("bytes"), list) else None
        own = tok.token_bytes(i)
        if sent and own and sent != own and sent.endswith(own):
            tokens.append(Token(None, sent[:-len(own)]))
            held += 1
        tokens.append(Token(i, entry=entry))
    return tokens, held


def token_text(tokenizer, tokens: list[Token]) -> bytes:
    return b"".join(t.held if t.id is None else tokenizer.token_bytes(t.id) for t in tokens)


def tokens_by_text(token_id: TokenIds, entries: list[dict], text: str, budget: int = 100_000) -> list[Token] | None:
    """One token per entry, each an alternative the entry lists (the most likely first), such that their text
    is the server's; tokens past its end after a control token (</s>) are the entry's most likely. A control
    token may show as its name or as nothing; whitespace the server dropped may be missing (the parsing layer
    says so). A depth-first search over (entry, characters matched, decoder state), bounded in steps."""
    tok, target = token_id.tokenizer, text.replace("\ufffd", "")
    options = [sorted(token_id.top(e).items(), key=lambda kv: -kv[1]) for e in entries]
    failed, steps = set(), 0
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    stack = [(0, 0, decoder.getstate(), [])]
    while stack and steps < budget:
        k, at, state, chosen = stack.pop()
        steps += 1
        if k == len(entries) or at == len(target) and k > 0 and tok.is_special(chosen[-1]):
            rest = [max(o, key=lambda kv: kv[1])[0] for o in options[k:] if o]
            if len(rest) == len(entries) - k:
                return [Token(i, entry=e) for i, e in zip(chosen + rest, entries)]
            continue
        if (k, at, state) in failed:
            continue
        failed.add((k, at, state))
        for i, _ in reversed(options[k]):      # pushed in reverse: the most likely is tried first
            decoder.setstate(state)
            pieces = ["", tok.special_name(i)] if tok.is_special(i) else [
                decoder.decode(tok.token_bytes(i)).replace("\ufffd", "")]
            for piece in dict.fromkeys(pieces + [p.lstrip() for p in pieces]):
                if target.startswith(piece, at):
                    stack.append((k + 1, at + len(piece), decoder.getstate(), chosen + [i]))
    return None


# ----------------------------------------------------------------------------- the reference

@torch.inference_mode()
def teacher_force(model, by_bytes: dict[bytes, int], prompt: list[int], images: list, tokens: list[Token]
                  ) -> tuple[list[Token], torch.Tensor, torch.Tensor]:
    """The reference's log-distributions [N, V] of each of the server's tokens given everything before it,
    and [V] of the token after the last. A held-back run of text becomes the tokens the reference prefers
    among those that spell it (at temperature 0, what a server that agrees with it generated)."""
    device = model.output.weight.device
    model.setup_cache(1, len(prompt) + sum(len(t.held) or 1 for t in tokens) + 1)
    at, rows, out, pending = 0, [], [], []

    def forward(ids: list[int], **kw) -> torch.Tensor:
        nonlocal at
        logits = model(torch.tensor([ids], device=device), input_pos=torch.arange(at, at + len(ids), device=device),
                       **kw)[0]
        at += len(ids)
        return logits.double().log_softmax(-1).cpu()

    def flush(row: torch.Tensor) -> torch.Tensor:
        if not pending:
            return row
        logits = forward([t.id for t in pending])
        rows.extend([row, *logits[:-1]])
        pending.clear()
        return logits[-1]

    row = forward(prompt, images=images or None, last_only=True)[-1]
    for t in tokens:
        if t.id is not None:
            out.append(t)
            pending.append(t)
            continue
        row, held = flush(row), t.held
        while held:   # the byte tokens spell anything, so some prefix is always a token
            piece, i = max(((held[:n], by_bytes[held[:n]]) for n in range(len(held), 0, -1) if held[:n] in by_bytes),
                           key=lambda pair: row[pair[1]].item())
            out.append(Token(i))
            rows.append(row)
            row, held = forward([i])[-1], held[len(piece):]
    row = flush(row)
    return out, torch.stack(rows) if rows else torch.zeros(0, row.shape[-1]), row


# ----------------------------------------------------------------------------- the comparison

@dataclass
class Position:
    server_id: int
    reference_top1: int
    rank: int                       # of the server's token under the reference (0: its top-1)
    server_logprob_ref: float       # the reference's logprob of the server's token
    top1_logprob_ref: float
    kl: float                       # lower bound of KL(server || reference), see the module docstring


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


@dataclass
class Layer:
    ok: bool | None     # None: not compared
    said: str


@dataclass
class Outcome:
    """One conversation through the server and the reference, layer by layer."""
    layers: dict[str, Layer]
    ids: list[int] = field(default_factory=list)          # the server's tokens
    positions: list[Position | None] = field(default_factory=list)   # None: no server logprobs there
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        first = next((name for name in LAYERS if self.layers.get(name, Layer(None, "")).ok is False), None)
        if first is not None:
            return f"departs at the {first} layer: {self.layers[first].said}"
        return "conforms" if any(layer.ok for layer in self.layers.values()) else "not compared"


class Reference:
    """The reference model and tokenizer, and the thresholds of a difference."""

    def __init__(self, session: Session, tie: float, max_kl: float | None):
        self.session, self.tokenizer, self.tie, self.max_kl = session, session.tokenizer, tie, max_kl
        self.token_id = TokenIds(self.tokenizer)

    def keep(self, ids: list[int]) -> str:
        return repr(self.tokenizer.decode(ids, special="keep"))

    def check(self, server: Server, messages: list, tools: list | None, max_tokens: int,
              streamed: bool = False) -> Outcome:
        """The conversation through the server (and once more streamed, to compare the parsing) and the
        reference, compared layer by layer."""
        prompt, images = self.session.encode(messages, tools)
        answer = server.chat(messages, tools, max_tokens)
        theirs, how = server.prompt_ids(messages, tools, answer)
        layers = {"prompt": self.prompt_layer(messages, prompt, theirs, how, answer.usage.get("prompt_tokens"))}
        if not answer.entries:
            raise InputError(f"{server.base}: the answer has no logprobs; the server must support logprobs")
        found = identify(self.token_id, answer)
        if found.problem:
            return Outcome({**layers, "decoding": Layer(False, found.problem)})
        # on the server's own prompt when it is known and differs (text only): the model layer then still means
        # something; the prompt layer has said the rest
        context = theirs if layers["prompt"].ok is False and theirs and not images else prompt
        model = self.session.load()
        images = [im.to(model.output.weight.device, model.output.weight.dtype) for im in images]
        tokens, rows, after = teacher_force(model, self.token_id.by_bytes, context, images, found.tokens)
        ids = [t.id for t in tokens]
        tops = [(self.token_id.top(t.entry) or None) if t.entry is not None else None for t in tokens]
        positions = [None if top is None else compare_position(i, top, row) for i, top, row in zip(ids, tops, rows)]
        layers["model"] = self.model_layer(ids, tops, rows, positions)
        if layers["model"].ok is False and layers["prompt"].ok and theirs is None:
            layers["model"].said += " (the prompt was compared by its length only: a prompt that differs in " \
                                    "its ids alone shows here)"
        layers["decoding"] = self.decoding_layer(ids, tops, after, answer.finish)
        answers = [("", answer)]
        if streamed:
            answers.append(("streamed: ", server.chat(messages, tools, max_tokens, stream=True)))
        layers["parsing"] = self.parsing_layer(ids, answers)
        notes = [f"tokens: {len(ids)}, {found.how}" + (" (the model layer read the server's own prompt)"
                                                       if context is not prompt else "")]
        counted = answer.usage.get("completion_tokens")
        if isinstance(counted, int) and counted != len(ids):
            notes.append(f"the server counts {counted} tokens, {len(ids)} were sent (the rest held back at the end)")
        return Outcome(layers, ids, positions, notes)

    def prompt_layer(self, messages, ours: list[int], theirs: list[int] | None, how: str, count) -> Layer:
        if theirs is not None:
            at = first_difference(ours, theirs)
            if at is None:
                return Layer(True, f"equal ({len(ours)} tokens, from {how})")
            return Layer(False, f"ids differ at {at} of {len(ours)} (theirs {len(theirs)}, from {how}): "
                                f"{self.prompt_cause(messages, ours, theirs, at)}; reference {self.keep(ours[at:at + 5])}, "
                                f"server {self.keep(theirs[at:at + 5])}, after {self.keep(ours[max(at - 8, 0):at])}")
        if isinstance(count, int) and not isinstance(count, bool):
            if count == len(ours):
                return Layer(True, f"same length ({count} tokens; only usage.prompt_tokens tells: {how})")
            return Layer(False, f"length differs: usage.prompt_tokens {count}, the reference's {len(ours)} ({how})")
        return Layer(None, f"not compared: {how}, no usage.prompt_tokens")

    def prompt_cause(self, messages, ours: list[int], theirs: list[int], at: int) -> str:
        tok = self.tokenizer
        names = [tok.special_name(i) for i in theirs[at:] if tok.is_special(i)]
        for i in ours[at:]:
            if tok.is_special(i) and tok.special_name(i) in names:
                names.remove(tok.special_name(i))
        typed = [name for name in dict.fromkeys(names) if name in json.dumps(messages, ensure_ascii=False)]
        if typed:
            return f"text became control tokens ({', '.join(typed)}): the server parses control-token strings " \
                   f"in the conversation's text, which the official prompt keeps as text"
        return diagnose(tok, messages, ours, theirs, at)

    def model_layer(self, ids, tops, rows, positions) -> Layer:
        known = [(k, top, row, p) for k, (top, row, p) in enumerate(zip(tops, rows, positions)) if p is not None]
        if not known:
            return Layer(None, "no logprobs")
        kls = [p.kl for _, _, _, p in known]
        worst = max(kls)
        departs, agree = None, 0
        for k, top, row, p in known:
            own = max(top, key=top.get)             # the server's top-1
            gap = row[p.reference_top1].item() - row[own].item()
            agree += own == p.reference_top1
            if departs is None and gap > self.tie:
                departs = f"position {k}: the server's top-1 {self.keep([own])} is {gap:.3g} nats below the " \
                          f"reference's {self.keep([p.reference_top1])} (rank {int((row > row[own]).sum())})"
        said = f"KL max {worst:.2g}, top-1 {agree}/{len(known)}"
        if departs is None and self.max_kl is not None and worst > self.max_kl:
            departs = f"KL {worst:.3g} > --max-kl {self.max_kl} at position {kls.index(worst)}"
        return Layer(departs is None, f"{said}; {departs}" if departs else said)

    def decoding_layer(self, ids, tops, after: torch.Tensor, finish) -> Layer:
        checked = 0
        for k, (i, top) in enumerate(zip(ids, tops)):
            if not top:
                continue
            own, checked = max(top, key=top.get), checked + 1
            if top[own] - top.get(i, -math.inf) > self.tie:
                return Layer(False, f"position {k}: took {self.keep([i])} (logprob {top.get(i, float('nan')):.4g}) "
                                    f"at temperature 0, its own top-1 is {self.keep([own])} ({top[own]:.4g})")
        eos = self.tokenizer.eos_id
        if finish == "stop" and (not ids or ids[-1] != eos) and int(after.argmax()) != eos:
            return Layer(False, f"stopped (finish_reason stop) where the reference's top-1 is "
                                f"{self.keep([int(after.argmax())])}, not </s> (rank {int((after > after[eos]).sum())})")
        return Layer(True, f"argmax at {checked}/{len(ids)}") if checked else Layer(None, "no alternatives")

    def parsing_layer(self, ids: list[int], answers: list[tuple[str, "Answer"]]) -> Layer:
        ours = parse_output(self.tokenizer, ids, tags=self.session.reasoning)
        for name, answer in answers:
            problem = self.parse_difference(ids, ours, answer)
            if problem:
                return Layer(False, name + problem)
        calls = f", {len(ours.tool_calls)} tool call{'s' * (len(ours.tool_calls) != 1)}" if ours.tool_calls else ""
        return Layer(True, f"content{calls} equal" + (", streamed alike" if len(answers) > 1 else ""))

    def content_cause(self, ids: list[int], want: str, have: str) -> str:
        tok = self.tokenizer
        if have == want.lstrip():
            return "the server drops the answer's leading whitespace"
        if have.strip() == want.strip():
            return "the whitespace at the ends differs"
        shown = [name for name in {tok.special_name(i) for i in ids if tok.is_special(i)} if name in have]
        if shown:
            return f"the server writes the control token {shown[0]} into the content (the official decoding " \
                   f"drops control tokens)"
        at = next((k for k, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
        return f"at character {at}: reference {want[at:at + 20]!r}, server {have[at:at + 20]!r}"

    def reasoning_difference(self, ours: AssistantOutput, answer: Answer) -> str | None:
        """How the server's split of a thought from the answer differs from the reference's reading of the
        same ids (chat.OutputStream: between [THINK] and [/THINK], or <think> tags that open a 2506 answer)."""
        if ours.reasoning is None:
            if answer.reasoning:
                return "the server splits off a thought where the reference reads none"
            return None
        if answer.reasoning is None:
            where = "leaves it in the content" if ours.reasoning.strip() in answer.content else "drops it"
            return f"the server does not split the thought off (no reasoning_content or reasoning field): {where}"
        if replaced(answer.reasoning).strip() != replaced(ours.reasoning).strip():
            return f"the thought differs: server {answer.reasoning[:40]!r}, reference {ours.reasoning[:40]!r}"
        return None

    def parse_difference(self, ids: list[int], ours: AssistantOutput, answer: Answer) -> str | None:
        """How the server's content and tool calls differ from the reference's reading of the server's tokens."""
        if len(answer.tool_calls) != len(ours.tool_calls):
            if not answer.tool_calls and all(call.name in answer.content for call in ours.tool_calls):
                return "the server leaves the tool call in the content, unparsed"
            return f"{len(answer.tool_calls)} tool calls, the reference parses {len(ours.tool_calls)}"
        marker = optional_special(self.tokenizer, "[TOOL_CALLS]")
        text_ids = ids[:ids.index(marker)] if marker in ids else ids
        problem = self.reasoning_difference(ours, answer)
        if problem:
            return problem
        # a server that splits the reasoning off answers ours.content; one that does not, the whole text
        want = ours.content if answer.reasoning is not None else self.tokenizer.decode(text_ids)
        if replaced(answer.content) != replaced(want):
            return f"content differs: {self.content_cause(text_ids, want, answer.content)}"
        for k, (theirs, mine) in enumerate(zip(answer.tool_calls, ours.tool_calls)):
            if theirs["name"] != mine.name:
                return f"tool call {k}: name {theirs['name']!r}, the reference's {mine.name!r}"
            try:
                arguments = json.loads(theirs["arguments"]) if isinstance(theirs["arguments"], str) else None
            except ValueError:
                arguments = None
            if isinstance(arguments, str) and isinstance(mine.arguments, dict):
                return f"tool call {k}: the arguments are double-encoded (a JSON string holding JSON: " \
                       f"{theirs['arguments'][:60]!r})"
            if arguments != mine.arguments:
                return f"tool call {k}: arguments {str(theirs['arguments'])[:60]!r}, the reference's " \
                       f"{mine.raw_arguments[:60]!r}"
        return None


# ----------------------------------------------------------------------------- one conversation

def report(reference: Reference, server: Server, outcome: Outcome) -> int:
    keep = reference.keep
    print(f"server              {server.url} ({len(outcome.ids)} tokens)")
    for note in server.notes + outcome.notes:
        print(f"note                {note}")
    print(f"prompt ids          {outcome.layers['prompt'].said}")
    positions = [p for p in outcome.positions if p is not None]
    if positions:
        agree = [p.rank == 0 for p in positions]
        kls = [p.kl for p in positions]
        print(f"top-1 agreement     {sum(agree) / len(agree):.6f} ({sum(agree)}/{len(agree)})")
        print(f"KL(server||ref)     mean {sum(kls) / len(kls):.3g}, max {max(kls):.3g} at position "
              f"{kls.index(max(kls))} (a lower bound: the tail beyond the server's top-{server.top} is one bucket)")
        print(f"rank under the ref  max {max(p.rank for p in positions)} (0: the reference's top-1)")
        first = next((k for k, p in enumerate(outcome.positions) if p is not None and p.rank), None)
        if first is None:
            print("first difference    none")
        else:
            p = outcome.positions[first]
            print(f"first difference    position {first}: server {p.server_id} {keep([p.server_id])} (reference rank "
                  f"{p.rank}, logprob {p.server_logprob_ref:.4f}), reference top-1 {p.reference_top1} "
                  f"{keep([p.reference_top1])} (logprob {p.top1_logprob_ref:.4f}), KL there {p.kl:.3g}")
            print(f"context             ...{keep(outcome.ids[max(first - 20, 0):first])} then server "
                  f"{keep([p.server_id])} / reference {keep([p.reference_top1])}")
    for name in LAYERS[1:]:
        if name in outcome.layers:
            print(f"{name + ' layer':<20}{outcome.layers[name].said}")
    print(f"verdict             {outcome.verdict}")
    return 0 if outcome.verdict == "conforms" else 1


def run(args) -> int:
    messages, tools = conversation(args)
    reference = make_reference(args)
    server = Server(args.url, args.timeout, args.served_model)
    return report(reference, server, reference.check(server, messages, tools, args.max_tokens))


def make_reference(args) -> Reference:
    tie = TIE[args.dtype] if args.tie is None else args.tie
    session = Session(args.model, args.device, args.dtype, tokenizer=args.tokenizer, mmproj=args.mmproj,
                      quant_math="exact")
    return Reference(session, tie, args.max_kl)


# ----------------------------------------------------------------------------- the conformance suite

def png_url(width: int, height: int, seed: int) -> str:
    """A width x height PNG of random pixels, as a data: URL: every resampling difference shows."""
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image(width: int, height: int, seed: int = 0) -> dict:
    return {"type": "image_url", "image_url": {"url": png_url(width, height, seed)}}


def weather_call(arguments: str) -> list[dict]:
    """The conversation up to a get_weather call and its result, fed back."""
    return [user("What's the weather in Paris?"), assistant(None, [call(arguments)]), result('{"temperature": 21}')]


@dataclass
class Case:
    messages: list[dict]
    tools: list[dict] | None = None
    streamed: bool = False          # also sent streamed: the parsing must come out alike


def suite_cases() -> dict[str, Case]:
    """The battery: what runtimes get wrong, one conversation each."""
    brief = system("You are a helpful assistant. Answer briefly.")
    return {
        "plain_text": Case([user("Hello, how are you?")]),
        "system_prompt": Case([brief, user("Hello, how are you?")]),
        "multi_part_text": Case([user([text("Here is a question."), text("What is the capital of France?")])]),
        "control_token_text": Case([user("What do [INST], </s> and [TOOL_CALLS] mean in a prompt?")]),
        "consecutive_users": Case([user("Here is my question."), user("What is the capital of France?")]),
        "image_28_multiple": Case([user([image(112, 140), text("What is in this image?")])]),
        "images_odd_sizes": Case([user([image(150, 97, 1), text("Compare these two images."), image(61, 205, 2)])]),
        "text_then_image": Case([user([text("What is in this image?"), image(112, 140)])]),
        "image_over_1024_tokens": Case([user([image(1008, 980, 3), text("Describe this image.")])]),
        "tools_offered": Case([user("What's the weather in Paris?")], [WEATHER]),
        "tool_result_fed_back": Case(weather_call('{"city": "Paris"}'), [WEATHER]),
        "tools_streamed": Case([user("What's the weather in Paris?")], [WEATHER], streamed=True),
        "multi_turn": Case([brief, user("Hi!"), assistant("Hello! How can I help?"), user("What is 2+2?"),
                            assistant("4."), user("And times 3?")]),
        "utf8_answer": Case([user("Écris une phrase en japonais avec des émojis : 日本の首都は？🗾")]),
        # a reasoning model thinks first: the thought must come apart from the answer, streamed alike
        "reasoning_split": Case([user("What is 17 times 23? Think it through.")], streamed=True),
    }


def run_suite(args) -> int:
    cases = suite_cases()
    chosen = args.cases.split(",") if args.cases else list(cases)
    unknown = [name for name in chosen if name not in cases]
    if unknown:
        raise InputError(f"--cases: unknown case {unknown[0]!r}; the cases: {', '.join(cases)}")
    reference = make_reference(args)
    server = Server(args.url, args.timeout, args.served_model)
    print(f"server  {server.url}  (temperature 0, {args.max_tokens} tokens per case)")
    width, departed = max(map(len, chosen)) + 2, False
    print(f"{'case':<{width}}{'prompt':<16}{'model':<36}{'decoding':<12}{'parsing':<12}verdict")
    for name in chosen:
        case = cases[name]
        try:
            outcome = reference.check(server, case.messages, case.tools, args.max_tokens, case.streamed)
        except Refused as e:
            if has_images(case.messages):
                print(f"{name:<{width}}skipped: the server takes no images here ({e.said.strip()[:100]})")
                continue
            outcome = Outcome({"prompt": Layer(False, f"the server refused the conversation: {e.said.strip()[:200]}")})
        departed |= outcome.verdict != "conforms" and outcome.verdict != "not compared"
        print(f"{name:<{width}}" + "".join(f"{column(outcome, layer):<{w}}" for layer, w in
                                           zip(LAYERS, (16, 36, 12, 12))) + outcome.verdict)
    for note in server.notes:
        print(f"note: {note}")
    return 1 if departed else 0


def column(outcome: Outcome, layer: str) -> str:
    """A layer's cell in the table: its figures for the model, else whether it conforms."""
    found = outcome.layers.get(layer)
    if found is None:
        return "-"
    mark = {True: "ok", False: "DEPARTS", None: "n/a"}[found.ok]
    if layer == "model" and found.ok is not None:
        return f"{mark} {found.said.split(';')[0]}"
    if layer == "prompt" and found.ok is not None:
        return f"{mark} {'ids' if found.said.startswith(('equal', 'ids')) else 'length'}"
    return mark


def check_conversation_flags(p: argparse.ArgumentParser, args) -> None:
    """The conversation comes one way: --suite's cases, a --messages file, or --prompt with --system and
    --image; a flag that the way taken would ignore is refused."""
    def given(*names: str) -> list[str]:
        return [f"--{name}" for name in names if getattr(args, name) not in (None, [])]
    if args.suite and (ignored := given("messages", "tools", "prompt", "system", "image")):
        p.error(f"--suite runs its own cases: {', '.join(ignored)} would be ignored")
    if args.cases and not args.suite:
        p.error("--cases goes with --suite")
    if args.messages and (ignored := given("prompt", "system", "image")):
        p.error(f"--messages and {', '.join(ignored)} cannot be combined: the --messages file holds the conversation")
    if args.prompt is None and (ignored := given("system", "image")):
        p.error(f"{', '.join(ignored)} go with --prompt")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error(f"--max-tokens {args.max_tokens}: expected at least 1")
    if args.tie is not None and not (math.isfinite(args.tie) and args.tie >= 0):
        p.error(f"--tie {args.tie}: expected a number >= 0")
    check_conversation_flags(p, args)
    try:
        return run_suite(args) if args.suite else run(args)
    except InputError as e:   # bad input or an unreachable server: one line; a bug keeps its traceback
        print(f"error: {as_flags(p, str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
