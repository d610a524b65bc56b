"""An OpenAI-compatible server for one model, on the Python standard library alone.

    python serve.py --model mistralai/Mistral-Small-3.2-24B-Instruct-2506 --port 8000

    GET  /v1/models             the one model served
    GET  /health                200 once the model is loaded; 503 {"status": "loading"} before
    POST /v1/chat/completions   answers, streamed or not: tools, images, stop strings, logprobs, usage
    POST /v1/completions        a text or token ids continued, as vLLM serves it: echo, prompt logprobs
    POST /tokenize              a conversation or a text -> its prompt ids (and image grids), to diff runtimes
    POST /detokenize            token ids -> text;   GET /tokenizer_info: the special tokens (vLLM's routes)

Threads: http.server gives each connection a thread, which reads and checks the request and encodes
the conversation (fetching and preprocessing its images); the prompt then goes to the one thread that
owns the model (batch.Engine), which answers up to --max-batch requests at once. A thread of each
answer's own turns the steps that come back into text, logprobs and tool calls as they come, and the
request's thread sends them. The server listens before the model loads (on a thread of its own): a port
in use fails at once, and until the model is ready every route but /health answers 503. One line per
request goes to stderr.
"""
import argparse
import hmac
import itertools
import json
import math
import queue
import re
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from batch import MAX_BATCH, Engine, Sequence
from chat import CALL_ID, OutputStream, ToolCall, image_slots, new_call_id, parse_output, partial_suffix
from generate import (SAMPLING_RANGES, Sampling, Session, Stats, Step, add_model_flags, add_sampling_flags,
                      as_flags, check_sampling_flags, flag_sampling, speed)
from images import SCHEME, file_url_path, token_grid
from inputs import InputError, parse_json

MAX_TOP_LOGPROBS = 20        # OpenAI's limit
MIN_LOGPROB = -9999.0        # what -inf is sent as (JSON has no infinity), as vLLM does
DISCONNECTED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


@dataclass
class Limits:
    max_body: int = 64 * 2**20         # bytes of a request body; more is refused with 413
    max_images: int = 10               # images in one conversation
    local_images: Path | None = None   # the one folder that local image paths may point into


class HTTPError(Exception):
    """A refused request, as OpenAI reports it: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(e: Exception) -> tuple[int, dict]:
    """(status, body) for an exception: HTTPError as it says, InputError 400, anything else 500."""
    if isinstance(e, HTTPError):
        status, param, code = e.status, e.param, e.code
    else:
        status, param, code = (400 if isinstance(e, InputError) else 500), None, None
    kind = "server_error" if status >= 500 else "invalid_request_error"
    message = str(e) if status < 500 else f"internal error: {type(e).__name__}: {e}"
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------- reading a request

@dataclass
class Request:
    messages: list
    tools: list | None
    sampling: Sampling
    seed: int | None
    stops: list[str]
    stream: bool
    include_usage: bool
    top_logprobs: int | None           # None: no logprobs
    token_ids: bool                    # vLLM's return_tokens_as_token_ids: tokens as "token_id:N"


def option(body: dict, name: str, kind: type, expected: str, ok=lambda value: True, default=None):
    """body[name] if it is a `kind` (an int will do for a float; a bool is never a number) and ok()."""
    value = body.get(name)
    if value is None:
        return default
    kinds = (int, float) if kind is float else kind
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kinds) or not ok(value):
        raise HTTPError(400, f"{name} must be {expected}, got {json.dumps(value)[:60]}", param=name)
    return value


def sampling_option(body: dict, name: str, kind: type, default, field: str | None = None, also=None):
    """body[name], a sampling value in the range generate.SAMPLING_RANGES gives for `field` (default:
    name); `also`: one more value taken."""
    in_range, expected = SAMPLING_RANGES[field or name]
    return option(body, name, kind, expected if also is None else f"{also} or {expected}",
                  lambda value: value == also or in_range(value), default)


def never(value) -> bool:
    """For a field whose every value asks for something."""
    return False


# Fields of OpenAI's and vLLM's chat requests that this server does not implement, each with the values
# that ask for nothing (clients send some by default): any other value is refused with a 400 naming the
# field, never silently ignored. null is the field not given.
NOT_IMPLEMENTED = {
    "response_format": lambda v: v == {"type": "text"},
    "tool_choice": lambda v: v in ("auto", "none"),
    "parallel_tool_calls": lambda v: v is True,
    "functions": lambda v: v == [], "function_call": lambda v: v in ("auto", "none"),
    "logit_bias": lambda v: v == {},
    "frequency_penalty": lambda v: v == 0, "presence_penalty": lambda v: v == 0,
    "repetition_penalty": lambda v: v == 1, "length_penalty": lambda v: v == 1,
    "min_p": lambda v: v == 0, "min_tokens": lambda v: v == 0,
    "best_of": lambda v: v == 1, "use_beam_search": lambda v: v is False,
    "ignore_eos": lambda v: v is False, "stop_token_ids": lambda v: v == [],
    "include_stop_str_in_output": lambda v: v is False, "echo": lambda v: v is False,
    "prompt_logprobs": never, "bad_words": lambda v: v == [], "allowed_token_ids": never,
    "modalities": lambda v: v == ["text"], "audio": never, "prediction": never, "web_search_options": never,
    "reasoning_effort": never,
    "guided_json": never, "guided_regex": never, "guided_choice": never, "guided_grammar": never,
    "structured_outputs": never,
    "chat_template": never, "chat_template_kwargs": lambda v: v == {},
    "continue_final_message": lambda v: v is False, "add_generation_prompt": lambda v: v is True,
    "truncate_prompt_tokens": never,
}


def refuse_unimplemented(body: dict) -> None:
    for name, asks_nothing in NOT_IMPLEMENTED.items():
        value = body.get(name)
        if value is not None and not asks_nothing(value):
            raise HTTPError(400, f"{name} {json.dumps(value)[:60]} is not implemented by this server (it would be "
                                 f"ignored); leave it out", param=name, code="unsupported_parameter")


def read_request(body: dict, card: Sampling, default_seed: int | None) -> Request:
    """The chat completion request's fields, checked; a field that asks for something this server does
    not do is refused (NOT_IMPLEMENTED); other unknown fields are ignored, as OpenAI clients send some
    that change no answer (user, metadata, store, ...)."""
    refuse_unimplemented(body)
    option(body, "n", int, "1 (one answer per request)", lambda n: n == 1)
    temperature = sampling_option(body, "temperature", float, card.temperature)
    top_p = sampling_option(body, "top_p", float, card.top_p)
    top_k = sampling_option(body, "top_k", int, card.top_k, also=-1)   # vLLM's -1: every token, as 0
    max_tokens = sampling_option(body, "max_completion_tokens", int,
                                 sampling_option(body, "max_tokens", int, card.max_tokens), field="max_tokens")
    stops = option(body, "stop", (str, list), "a string or a list of non-empty strings", lambda s: all(
        isinstance(x, str) and x for x in ([s] if isinstance(s, str) else s)), [])
    stream_options = option(body, "stream_options", dict, "an object such as {\"include_usage\": true}", default={})
    logprobs = option(body, "logprobs", bool, "true or false", default=False)
    top = option(body, "top_logprobs", int, f"an integer from 0 to {MAX_TOP_LOGPROBS}",
                 lambda n: 0 <= n <= MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise HTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tools = option(body, "tools", list, "a list of tools")
    return Request(
        messages=body.get("messages"),
        tools=None if body.get("tool_choice") == "none" else tools,   # "none": not offered, the model answers
        sampling=Sampling(temperature, top_p, max(top_k, 0), max_tokens),
        seed=sampling_option(body, "seed", int, default_seed),
        stops=[stops] if isinstance(stops, str) else stops,
        stream=option(body, "stream", bool, "true or false", default=False),
        include_usage=option(stream_options, "include_usage", bool, "true or false", default=False),
        top_logprobs=(top or 0) if logprobs else None,
        token_ids=option(body, "return_tokens_as_token_ids", bool, "true or false", default=False))


def check_images(messages, limits: Limits) -> None:
    """Refuse, before anything is read, too many images and images that the server must not read:
    data: and http(s) URLs are fine; a local path or file:// URL only inside limits.local_images.
    Local sources are replaced by their resolved path. (The structure is checked later, by encode_chat.)"""
    slots = image_slots(messages)
    if len(slots) > limits.max_images:
        raise HTTPError(400, f"the conversation has {len(slots)} images, more than the {limits.max_images} "
                             f"this server takes (--max-images)", param="messages")
    for holder, key in slots:
        holder[key] = image_source(holder.get(key), limits.local_images)


def image_source(source, folder: Path | None):
    """The source to load for an image the client names (see check_images)."""
    scheme = SCHEME.match(source) if isinstance(source, str) else None
    if not isinstance(source, str) or scheme and scheme.group(1).lower() != "file":
        return source   # not a string, data:, http(s) or another scheme: encode_chat says what is wrong
    if "\0" in source:
        raise HTTPError(400, f"{source[:60]!r}: a NUL byte in an image path", param="messages")
    if folder is None:
        raise HTTPError(400, "this server reads no local image files (start it with --allow-local-images DIR); "
                             "send the image as a data: or http(s) URL", param="messages")
    if scheme:
        try:
            source = str(file_url_path(source))
        except InputError as e:   # not a local file:// URL
            raise HTTPError(400, str(e), param="messages") from None
    path = (folder / source).resolve()       # an absolute source stays itself; symlinks resolved
    if not path.is_relative_to(folder.resolve()):
        raise HTTPError(400, f"{source:.60}: outside the folder this server reads images from", param="messages")
    return str(path)


# ----------------------------------------------------------------------------- answering (the model thread)

@dataclass
class Final:
    content: str
    reasoning: str | None     # a reasoning model's thought; None where the answer began none
    tool_calls: list[dict]
    finish_reason: str
    usage: dict
    logprobs: list[dict]
    stats: Stats | None        # the answer's timings, for the request's log line


# What the model thread sends a request's thread, in order: Delta per token, then Done or Failed.
@dataclass
class Delta:
    text: str                 # content to send now (may be empty: held back, or inside a tool call)
    logprobs: list[dict]      # this token's logprobs entry, when asked for
    reasoning: str = ""       # thought to send now


@dataclass
class Done:
    final: Final


@dataclass
class Failed:
    error: Exception


class Answer:
    """One answer as it is generated, on its own thread: the thought and the content read from the ids
    as they come (chat.OutputStream), the content cut at a stop string and held back where one may begin
    (stop strings apply to the content, not the thought); the logprobs. chat: a chat answer (a reasoning
    model's thought and tool calls read apart), else a completion's plain text."""

    def __init__(self, tokenizer, request: Request, reasoning: bool = False, chat: bool = True):
        self.tokenizer, self.request, self.tags = tokenizer, request, reasoning
        self.output = OutputStream(tokenizer, tags=reasoning, split=chat)
        self.text, self.sent = "", 0         # the content so far, and how much of it was sent
        self.thought = ""
        self.stopped = False
        self.ids: list[int] = []
        self.logprobs: list[dict] = []

    def add(self, step: Step) -> Delta:
        """A generated token -> what to send for it."""
        self.ids.append(step.token)
        entries = self.entries([step.token], step.logits[-1:]) if self.request.top_logprobs is not None else []
        self.logprobs += entries
        return self.delta(self.output.feed(step.token), entries)

    def delta(self, pieces: list[tuple[str, str]], entries: list[dict]) -> Delta:
        thought = "".join(text for kind, text in pieces if kind == "reasoning")
        self.thought += thought
        for kind, text in pieces:
            if kind == "content" and not self.stopped:
                self.add_text(text)
        return Delta(self.unsent(), entries, thought)

    def add_text(self, piece: str):
        before, self.text = len(self.text), self.text + piece
        longest = max(map(len, self.request.stops), default=0)
        found = [i for i in (self.text.find(s, max(before - longest + 1, 0)) for s in self.request.stops) if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True

    def unsent(self) -> str:
        """The text not yet sent, less a tail that may be the start of a stop string."""
        hold = 0 if self.stopped else max((partial_suffix(self.text, s) for s in self.request.stops), default=0)
        end = max(len(self.text) - hold, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def entries(self, tokens: list[int], logits: torch.Tensor) -> list[dict]:
        """The logprob entries of `tokens`, each drawn from its row of logits [n, V] (raw: before temperature)."""
        logprobs = logits.float().log_softmax(-1)                                            # [n, V]
        chosen = logprobs.gather(-1, torch.tensor(tokens, dtype=torch.long, device=logprobs.device)[:, None])[:, 0].tolist()
        top = logprobs.topk(self.request.top_logprobs) if self.request.top_logprobs else None
        tops = zip(top.indices.tolist(), top.values.tolist()) if top is not None else [([], [])] * len(tokens)
        return [{**self.token_entry(token, logprob), "top_logprobs": [self.token_entry(i, lp) for i, lp in zip(*best)]}
                for token, logprob, best in zip(tokens, chosen, tops)]

    def token_entry(self, token: int, logprob: float) -> dict:
        special = self.tokenizer.is_special(token)
        data = self.tokenizer.special_name(token).encode() if special else self.tokenizer.token_bytes(token)
        text = f"token_id:{token}" if self.request.token_ids else data.decode("utf-8", errors="replace")
        return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(data)}

    def finish(self, prompt_tokens: int, stats: Stats | None = None) -> tuple[Delta, Final]:
        """Once generation has ended: the text left to send, and the answer (tool calls, why it ended)."""
        last = self.delta(self.output.close(), [])   # what was held back: an incomplete character, a tag
        calls = parse_output(self.tokenizer, self.ids, self.tags).tool_calls if self.output.calls else []
        unreadable = "".join(call.raw_arguments for call in calls if not call.name)   # sent as text
        if unreadable and not self.stopped:
            self.add_text(unreadable)
            last.text += self.unsent()
        calls = [tool_call(call) for call in calls if call.name]
        ended = self.stopped or self.ids[-1] == self.tokenizer.eos_id
        finish = "length" if not ended else "tool_calls" if calls else "stop"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(self.ids),
                 "total_tokens": prompt_tokens + len(self.ids)}
        thought = self.thought if self.output.reasoned else None
        return last, Final(self.text, thought, calls, finish, usage, self.logprobs, stats)


def reasoning_fields(thought: str | None) -> dict:
    """A thought as the message or delta fields that carry it: `reasoning_content` (vLLM's and DeepSeek's
    name) and `reasoning` (vLLM's newer one), the same text in both; none without a thought."""
    return {} if thought is None else {"reasoning_content": thought, "reasoning": thought}


def tool_call(call: ToolCall) -> dict:
    """A parsed call in the OpenAI shape; an id the model wrote is kept if it has the 9-character form."""
    call_id = call.id if call.id and CALL_ID.fullmatch(call.id) else new_call_id()
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.raw_arguments}}


@dataclass
class Job:
    """An encoded request; its answer's thread sends on `events` (Delta ..., then Done or Failed)."""
    ids: list[int]
    images: list[torch.Tensor]
    request: Request
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)   # set when the client is gone

    def start(self, engine: Engine):
        """Submit the prompt to the engine (refused there if it cannot fit); a thread of the answer's own
        turns its steps into events as they come, so that no step's logits wait for a slow client."""
        sequence = engine.submit(self.ids, self.images, self.request.sampling, self.request.seed,
                                 logits=self.request.top_logprobs is not None)
        threading.Thread(target=self.run, args=(engine.session, sequence), daemon=True).start()

    def run(self, session: Session, sequence: Sequence):
        try:
            answer, stats = Answer(session.tokenizer, self.request, session.reasoning), Stats(len(self.ids))
            with closing(sequence.steps()) as steps:   # leaving the loop cancels the sequence
                for step in steps:
                    if self.cancelled.is_set():  # the client is gone
                        break
                    self.events.put(answer.add(step))
                    stats = step.stats
                    if answer.stopped:
                        break
            last, final = answer.finish(len(self.ids), stats)
            self.events.put(last)
            self.events.put(Done(final))
        except Exception as e:   # reported by the request's thread
            self.events.put(Failed(e))


# ----------------------------------------------------------------------------- completions (the legacy API)

DEFAULT_COMPLETION_TOKENS = 16   # max_tokens when a completion request leaves it out (OpenAI's, vLLM's)


@dataclass
class Completion:
    prompts: list[list[int]]   # each prompt's ids (a batch of prompts answers each in its own row)
    echo: bool                 # each answer starts with its prompt: text, and logprobs when asked
    score_only: bool           # max_tokens 0 with echo: the prompt scored, nothing generated
    request: Request           # what chat completions share: sampling, seed, stop, stream, logprobs (top n)


def read_completion(body: dict, tokenizer, card: Sampling, default_seed: int | None) -> Completion:
    """The completion request's fields, checked. The fields it shares with chat completions are read as
    theirs are; here logprobs is a number, the n likeliest tokens beside the chosen one (0: the chosen
    alone), and max_tokens may be 0 with echo."""
    logprobs = option(body, "logprobs", int, f"an integer from 0 to {MAX_TOP_LOGPROBS}",
                      lambda n: 0 <= n <= MAX_TOP_LOGPROBS)
    echo = option(body, "echo", bool, "true or false", default=False)
    max_tokens = sampling_option(body, "max_tokens", int, DEFAULT_COMPLETION_TOKENS, also=0)
    if max_tokens == 0 and not echo:
        raise HTTPError(400, "max_tokens 0 needs echo: true (the prompt scored, nothing generated)", param="max_tokens")
    shared = {key: value for key, value in body.items() if key not in ("logprobs", "top_logprobs", "echo")}
    request = read_request({**shared, "max_tokens": max(max_tokens, 1), "max_completion_tokens": None}, card,
                           default_seed)
    request.top_logprobs = logprobs
    return Completion(read_prompts(body.get("prompt"), tokenizer), echo, max_tokens == 0, request)


def read_prompts(prompt, tokenizer) -> list[list[int]]:
    """The prompt field: a text, a list of token ids, or a non-empty list of either (a batch) -> each
    prompt's ids. A text is encoded after <s>, as vLLM does; ids are taken as they are."""
    def ids(p) -> list[int] | None:
        if isinstance(p, str):
            return tokenizer.encode(p, bos=True)
        return p if isinstance(p, list) and p and all(type(t) is int for t in p) else None   # bool is no id

    prompts = [ids(prompt)]
    if prompts[0] is None and isinstance(prompt, list) and prompt:
        prompts = [ids(p) for p in prompt]
    if None in prompts:
        raise HTTPError(400, f"prompt must be a text, a non-empty list of token ids, or a non-empty list of either, "
                             f"got {json.dumps(prompt)[:60]}", param="prompt")
    bad = next((t for p in prompts for t in p if not 0 <= t < tokenizer.n_words), None)
    if bad is not None:
        raise HTTPError(400, f"prompt: token id {bad} is out of range: the tokenizer has ids 0 to "
                             f"{tokenizer.n_words - 1}", param="prompt")
    return prompts


def completion_pieces(answer: Answer, completion: Completion, ids: list[int], sequence: Sequence) -> Iterator[dict]:
    """One choice as it is generated: pieces {"text", "logprobs", "finish_reason"}, the echoed prompt
    first, then one per token, the last with the finish reason. Logprobs in the legacy shape (legacy_logprobs);
    their text offsets count in the choice's whole text."""
    with_logprobs = completion.request.top_logprobs is not None
    start = 0                                   # where the answer begins in the choice's text
    with closing(sequence.steps()) as steps:
        for step in steps:
            if completion.echo and not answer.ids:
                text, offsets = text_offsets(answer.tokenizer, ids)
                entries = None
                if with_logprobs:   # step.logits [S, V]: row i is the distribution of ids[i + 1]
                    first = {"token": answer.token_entry(ids[0], 0.0)["token"], "logprob": None}
                    entries = [first] + answer.entries(ids[1:], step.logits[:-1])
                yield piece(text, entries, offsets)
                start = len(text)
            if completion.score_only:
                break
            before = len(answer.text)
            delta = answer.add(step)
            yield piece(delta.text, delta.logprobs if with_logprobs else None, [start + before])
            if answer.stopped:
                break
    if completion.score_only:
        yield piece("", None, [], "length")
        return
    last, final = answer.finish(len(ids))
    yield piece(last.text, None, [], final.finish_reason)


def piece(text: str, entries: list[dict] | None, offsets: list[int], finish: str | None = None) -> dict:
    return {"text": text, "logprobs": None if entries is None else legacy_logprobs(entries, offsets),
            "finish_reason": finish}


def legacy_logprobs(entries: list[dict], offsets: list[int]) -> dict:
    """Logprob entries of the chat shape -> the legacy shape: tokens, token_logprobs, top_logprobs (per
    token {token: logprob} for the token itself and the n likeliest: up to n + 1) and text_offset (where
    each token's text begins). An echoed prompt's first token has no logprob: null, its top too."""
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["logprob"] is None else
                             {e["token"]: e["logprob"], **{t["token"]: t["logprob"] for t in e["top_logprobs"]}}
                             for e in entries],
            "text_offset": offsets}


def merge_pieces(pieces: list[dict]) -> dict:
    """A choice's pieces -> the choice's text, logprobs and finish reason."""
    logprobs = [p["logprobs"] for p in pieces if p["logprobs"] is not None]
    return {"text": "".join(p["text"] for p in pieces), "finish_reason": pieces[-1]["finish_reason"],
            "logprobs": {key: [x for lp in logprobs for x in lp[key]] for key in logprobs[0]} if logprobs else None}


def in_thread(items: Iterator) -> Iterator:
    """The items of `items`, made from now on in a thread of their own, as fast as they come."""
    out = queue.Queue()

    def run():
        try:
            for item in items:
                out.put(item)
            out.put(None)
        except Exception as e:   # raised where the items are read
            out.put(e)

    def received():
        while (item := out.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item
    threading.Thread(target=run, daemon=True).start()
    return received()


def text_offsets(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """The text of `ids` and where each token's text begins in it (control tokens write none; a
    character split over two tokens begins at the first)."""
    text, offsets, stream = "", [], OutputStream(tokenizer, tags=False, split=False)
    for token in ids:
        offsets.append(len(text))
        text += "".join(piece for _, piece in stream.feed(token))
    return text + "".join(piece for _, piece in stream.close()), offsets


# ----------------------------------------------------------------------------- HTTP

class Server(ThreadingHTTPServer):
    # Connection threads are joined on close (server_close), not left running while Python exits: a
    # thread still alive then can abort the process ("terminate called without an active exception").
    daemon_threads = False

    def __init__(self, session: Session, model_id: str, limits: Limits | None = None, host: str = "127.0.0.1",
                 port: int = 8000, default_seed: int | None = None, max_batch: int = MAX_BATCH,
                 max_len: int | None = None, api_key: str | None = None, allow_origins: tuple[str, ...] = ()):
        """max_batch, max_len: see batch.Engine. api_key: what clients must send as "Authorization: Bearer
        KEY" (every route but /health). allow_origins: the web origins whose pages may call the server
        (CORS; "*" for any); none by default."""
        super().__init__((host, port), Handler)   # listening: a port in use fails here, before any loading
        self.session, self.model_id, self.default_seed = session, model_id, default_seed
        self.limits = limits or Limits()
        self.api_key, self.allow_origins = api_key, allow_origins
        self.created = int(time.time())
        self.engine = Engine(session, max_batch, max_len)
        self.connections: set[socket.socket] = set()   # open client connections, ended on close
        self.connections_lock = threading.Lock()
        self.ready = threading.Event()                  # set once the model is loaded
        self.load_error: BaseException | None = None    # why loading failed (the server then stops)
        threading.Thread(target=self.load, name="load", daemon=True).start()

    def load(self):
        """Load the model while the server answers /health with 503; a failure stops the server."""
        try:
            self.session.load()
        except BaseException as e:   # bad weights or a bug: serve_forever returns, main reports it
            self.load_error = e
            self.shutdown()
            return
        self.ready.set()
        host, port = self.server_address[:2]
        print(f"serving {self.model_id} on http://{host}:{port}/v1", file=sys.stderr, flush=True)

    def handle_error(self, request, client_address):
        """A client gone while its request was read or answered is no error of the server's."""
        if not isinstance(sys.exc_info()[1], DISCONNECTED):
            super().handle_error(request, client_address)

    def process_request_thread(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.connections.discard(request)

    def close(self):
        """Stop accepting, end every open connection (an idle keep-alive one, a stream: its answer is then
        cancelled), wait for their threads, then for the engine's."""
        self.shutdown()
        with self.connections_lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:   # already closed by the client
                    pass
        self.server_close()
        self.engine.close()

    def allowed_origin(self, origin: str | None) -> str | None:
        """What Access-Control-Allow-Origin says to a request from `origin`: None when it may not read."""
        if origin is None or not self.allow_origins:
            return None
        return "*" if "*" in self.allow_origins else origin if origin in self.allow_origins else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"    # keep-alive, as the openai client expects
    timeout = 300                    # seconds a connection may sit idle
    server: Server

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_OPTIONS(self):
        self.route("OPTIONS")

    def route(self, method: str):
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        length = self.headers.get("Content-Length", "")
        # bytes of the body not read yet; fullmatch, not isdigit, which takes "²" too
        self.unread = int(length) if re.fullmatch(r"[0-9]{1,18}", length) else 0
        self.status, self.note, self.started = None, "", time.perf_counter()   # for the log line
        try:
            if method == "OPTIONS" and self.server.allow_origins:
                handler = Handler.preflight
            else:
                if path != "/health":
                    self.check_api_key()
                handler = ROUTES.get((method, path))
            if handler is None:
                raise HTTPError(404, f"unknown route: {method} {path}", code="unknown_url")
            if not self.server.ready.is_set() and handler not in (Handler.health, Handler.preflight):
                raise HTTPError(503, "the model is loading; /health answers 200 once it is ready", code="loading")
            handler(self)
        except DISCONNECTED:
            self.close_connection = True
            self.note = self.note or "the client left"
        except Exception as e:
            self.send_error_json(e)
        self.log_message("%s", f"{method} {path} {self.status or '-'} {self.note}".rstrip())

    def send_response(self, code: int, message: str | None = None):
        self.status = code
        super().send_response(code, message)

    def log_request(self, code="-", size="-"):
        """Nothing: route logs one line per request, once it is answered."""

    def check_api_key(self):
        key = self.server.api_key
        given = self.headers.get("Authorization", "")
        if key is not None and not hmac.compare_digest(given.encode(errors="replace"), f"Bearer {key}".encode()):
            raise HTTPError(401, "this server needs its API key: send the header Authorization: Bearer KEY",
                            code="invalid_api_key")

    def end_headers(self):
        """Every response, CORS headers included for an allowed origin (--allow-origin)."""
        origin = self.server.allowed_origin(self.headers.get("Origin") if getattr(self, "headers", None) else None)
        if origin is not None:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        super().end_headers()

    def send_error_json(self, e: Exception):
        status, body = error_body(e)
        self.close_connection, self.status = True, status
        self.note = f"{self.note}: {body['error']['message']}" if self.note else body["error"]["message"]
        if status >= 500:
            traceback.print_exception(e)   # a bug: its traceback on the server's stderr
        try:
            self.skip_body()
            self.send_json(status, body)
        except DISCONNECTED:               # the client left without its answer: never to report
            self.note += " (the client left)"

    def send_json(self, status: int, body: dict):
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def start_events(self):
        """A 200 whose body is server-sent events (send_event), ended by closing the connection."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")   # the stream's end is the connection's
        self.end_headers()
        self.close_connection = True

    def send_event(self, data: dict | str):
        """One server-sent event: `data: JSON` (or a bare word such as [DONE])."""
        self.wfile.write(f"data: {json.dumps(data, ensure_ascii=False) if isinstance(data, dict) else data}\n\n"
                         .encode())
        self.wfile.flush()

    def skip_body(self, seconds: float = 5.0):
        """Read and drop the unread part of a refused request's body, for a few seconds at most: a
        connection closed with input unread is reset, and the client may lose the response."""
        deadline = time.monotonic() + seconds
        while self.unread > 0 and time.monotonic() < deadline:
            chunk = self.rfile.read1(min(self.unread, 2**16))
            if not chunk:
                break
            self.unread -= len(chunk)

    def read_body(self) -> dict:
        if not re.fullmatch(r"[0-9]{1,18}", self.headers.get("Content-Length", "")):
            raise HTTPError(411, "a POST needs a Content-Length header (a number of bytes)", code="length_required")
        if self.unread > self.server.limits.max_body:
            raise HTTPError(413, f"the request body is {self.unread} bytes, over this server's limit of "
                                 f"{self.server.limits.max_body} bytes (--max-body-mb)", code="request_too_large")
        data, self.unread = self.rfile.read(self.unread), 0
        try:
            body = parse_json(data, "the request body")   # nesting bounded, then json.loads
        except InputError as e:
            raise HTTPError(400, str(e), code="invalid_json") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    # -- routes

    def models(self):
        self.send_json(200, {"object": "list", "data": [{"id": self.server.model_id, "object": "model",
                                                         "created": self.server.created, "owned_by": "local"}]})

    def health(self):
        if self.server.ready.is_set():
            self.send_json(200, {"status": "ok"})
        else:
            self.send_json(503, {"status": "loading"})   # as llama-server: up, but not ready

    def preflight(self):
        """A browser asks whether a page from its Origin may send a request (CORS, with --allow-origin)."""
        origin = self.headers.get("Origin")
        if self.server.allowed_origin(origin) is None:
            raise HTTPError(403, f"origin {str(origin)[:80]!r} is not allowed (--allow-origin)", code="origin_not_allowed")
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def tokenize(self):
        """{messages, tools} -> {tokens, count, max_model_len, images: [[rows, cols], ...]} (vLLM's keys);
        {prompt, add_special_tokens} -> {tokens, count, max_model_len}: a text's ids, after <s> unless
        add_special_tokens is false (vLLM's, which lm-evaluation-harness's remote tokenizer asks)."""
        body = self.read_body()
        session = self.server.session
        if body.get("prompt") is not None:
            prompt = option(body, "prompt", str, "a string")
            ids = session.tokenizer.encode(prompt, bos=option(body, "add_special_tokens", bool, "true or false",
                                                              default=True))
            self.send_json(200, {"tokens": ids, "count": len(ids), "max_model_len": self.server.engine.max_len})
            return
        check_images(body.get("messages"), self.server.limits)
        ids, images = session.encode(body.get("messages"), option(body, "tools", list, "a list of tools"))
        config = session.tokenizer.image
        grids = [list(token_grid(im, config.patch_size, config.spatial_merge_size)) for im in images]
        self.send_json(200, {"tokens": ids, "count": len(ids), "max_model_len": self.server.engine.max_len,
                             "images": grids})

    def detokenize(self):
        """{tokens} -> {prompt}: the text of token ids (control tokens write none)."""
        tokens = option(self.read_body(), "tokens", list, "a list of token ids", default=[])
        if not all(type(t) is int for t in tokens):
            raise HTTPError(400, f"tokens must be a list of token ids, got {json.dumps(tokens)[:60]}", param="tokens")
        self.send_json(200, {"prompt": self.server.session.tokenizer.decode(tokens)})

    def tokenizer_info(self):
        tokenizer = self.server.session.tokenizer
        self.send_json(200, {"tokenizer_class": type(tokenizer).__name__, "model_max_length": self.server.engine.max_len,
                             "bos_token": tokenizer.special_name(tokenizer.bos_id),
                             "eos_token": tokenizer.special_name(tokenizer.eos_id)})

    def warn_of_another_model(self, body: dict):
        asked = body.get("model")
        if isinstance(asked, str) and asked != self.server.model_id:
            self.log_message("warning: the request names model %r; this server serves %r and answers with it "
                             "(--served-model-name sets the name it serves under)", asked[:100], self.server.model_id)

    def chat_completions(self):
        body = self.read_body()
        self.warn_of_another_model(body)
        request = read_request(body, self.server.session.sampling, self.server.default_seed)
        check_images(request.messages, self.server.limits)
        job = Job(*self.server.session.encode(request.messages, request.tools), request)
        job.start(self.server.engine)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.server.model_id}
        self.note = head["id"]
        event = job.events.get()
        first_token = time.perf_counter() - self.started
        if isinstance(event, Failed):        # before any token: an ordinary error response
            raise event.error
        if request.stream:
            self.stream(job, head, event, first_token)
            return
        while not isinstance(event, Done):
            event = job.events.get()
            if isinstance(event, Failed):
                raise event.error
        final = event.final
        self.note = summary(head["id"], final, first_token)
        message = {"role": "assistant", "content": final.content if final.content or not final.tool_calls else None,
                   "tool_calls": final.tool_calls or None, **reasoning_fields(final.reasoning)}
        choice = {"index": 0, "message": message, "finish_reason": final.finish_reason,
                  "logprobs": {"content": final.logprobs} if request.top_logprobs is not None else None}
        self.send_json(200, {**head, "object": "chat.completion", "choices": [choice], "usage": final.usage})

    def stream(self, job: Job, head: dict, event: Delta | Done | Failed, first_token: float):
        """Server-sent events: a role delta, content deltas, tool-call deltas, the finish reason, the
        usage (if asked), [DONE]. A client that goes away cancels its job."""
        request = job.request
        self.start_events()
        send = self.send_event

        def chunk(delta: dict, logprobs: list | None = None, finish: str | None = None) -> dict:
            choice = {"index": 0, "delta": delta, "finish_reason": finish,
                      "logprobs": {"content": logprobs} if logprobs else None}
            usage = {"usage": None} if request.include_usage else {}
            return {**head, "object": "chat.completion.chunk", "choices": [choice], **usage}

        try:
            send(chunk({"role": "assistant", "content": ""}))
            while isinstance(event, Delta):
                if event.text or event.reasoning or event.logprobs:
                    delta = {**reasoning_fields(event.reasoning or None), **({"content": event.text} if event.text else {})}
                    send(chunk(delta, event.logprobs))
                event = job.events.get()
            if isinstance(event, Failed):
                status, body = error_body(event.error)
                self.note += f": failed mid-answer: {body['error']['message']}"
                if status >= 500:
                    traceback.print_exception(event.error)
                send(body)
            else:
                final = event.final
                self.note = summary(head["id"], final, first_token)
                for i, call in enumerate(final.tool_calls):   # the call, then its arguments
                    send(chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                                "function": {"name": call["function"]["name"], "arguments": ""}}]}))
                    send(chunk({"tool_calls": [{"index": i, "function": {"arguments": call["function"]["arguments"]}}]}))
                send(chunk({}, finish=final.finish_reason))
                if request.include_usage:
                    send({**head, "object": "chat.completion.chunk", "choices": [], "usage": final.usage})
            send("[DONE]")
        except DISCONNECTED:
            job.cancelled.set()   # the answer's thread stops at the next token, the engine drops it
            self.note += ": the client left mid-answer"

    def completions(self):
        """OpenAI's legacy completions as vLLM serves them: each prompt of a batch is its own choice,
        all answered at once (each in its own row of the engine)."""
        body = self.read_body()
        self.warn_of_another_model(body)
        session, engine = self.server.session, self.server.engine
        completion = read_completion(body, session.tokenizer, session.sampling, self.server.default_seed)
        request, echo_logprobs = completion.request, completion.echo and completion.request.top_logprobs is not None
        sequences = []
        try:
            for ids in completion.prompts:
                sequences.append(engine.submit(ids, [], request.sampling, request.seed,
                                               logits=request.top_logprobs is not None, prompt_logits=echo_logprobs))
            answers = [Answer(session.tokenizer, request, chat=False) for _ in sequences]
            choices = [in_thread(completion_pieces(answer, completion, ids, sequence))   # no logits wait for us
                       for answer, ids, sequence in zip(answers, completion.prompts, sequences)]
            head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": self.server.model_id}

            def usage() -> dict:   # once the answers are complete
                prompt, generated = sum(map(len, completion.prompts)), sum(len(a.ids) for a in answers)
                return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}
            self.note = head["id"]
            if request.stream:
                self.stream_completion(choices, head, request.include_usage, usage)
            else:
                choices = [{"index": i, **merge_pieces(list(pieces))} for i, pieces in enumerate(choices)]
                self.send_json(200, {**head, "choices": choices, "usage": usage()})
            self.note += f": {len(sequences)} prompt(s), {usage()['prompt_tokens']} prompt tokens, " \
                         f"{usage()['completion_tokens']} generated"
        finally:
            for sequence in sequences:   # those left (an error, a client gone) free their rows
                sequence.cancelled.set()

    def stream_completion(self, choices: list[Iterator[dict]], head: dict, include_usage: bool, usage):
        """Server-sent events: the pieces of each choice in turn (all are generated at once), each as a
        chunk with one choice; the usage (if asked); [DONE]. An error after the first chunk is an error
        event."""
        first = next(choices[0])   # an error before anything is sent is an ordinary error response
        choices[0] = itertools.chain([first], choices[0])
        self.start_events()
        send = self.send_event

        extra = {"usage": None} if include_usage else {}
        try:
            for index, pieces in enumerate(choices):
                for p in pieces:
                    if p["text"] or p["logprobs"] or p["finish_reason"]:
                        send({**head, "choices": [{"index": index, **p}], **extra})
            if include_usage:
                send({**head, "choices": [], "usage": usage()})
        except DISCONNECTED:
            raise
        except Exception as e:
            status, body = error_body(e)
            if status >= 500:
                traceback.print_exception(e)
            send(body)
        send("[DONE]")


def summary(request_id: str, final: Final, first_token: float) -> str:
    """A request's log line: its id, tokens, time to first token (from the request's arrival, queueing
    included), decoding speed, why it ended."""
    s = final.stats
    return (f"{request_id}: {final.usage['prompt_tokens']} prompt tokens, {final.usage['completion_tokens']} "
            f"generated, first token {first_token:.2f} s, decode {speed(s.decode_steps, s.decode_s)}, "
            f"finish {final.finish_reason}")


ROUTES = {("GET", "/v1/models"): Handler.models, ("GET", "/health"): Handler.health,
          ("POST", "/v1/chat/completions"): Handler.chat_completions, ("POST", "/tokenize"): Handler.tokenize,
          ("POST", "/v1/completions"): Handler.completions, ("POST", "/detokenize"): Handler.detokenize,
          ("GET", "/tokenizer_info"): Handler.tokenizer_info}


# ----------------------------------------------------------------------------- the command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_sampling_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: %(default)s)")
    p.add_argument("--served-model-name", help="the model id clients see (default: --model as given)")
    p.add_argument("--allow-local-images", metavar="DIR", help="let requests name image files inside DIR (paths "
                                                               "or file:// URLs); by default only data: and http(s)")
    p.add_argument("--max-images", type=int, default=Limits.max_images, help="images per conversation "
                                                                             "(default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=Limits.max_body / 2**20,
                   help="largest request body in MiB; more is refused with 413 (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="requests answered at once (continuous "
                                                                    "batching); more wait (default: %(default)s)")
    p.add_argument("--max-model-len", type=int, help="positions one request may take, prompt and answer (default: "
                                                     "the model's context); the KV cache grows up to --max-batch "
                                                     "rows of this many")
    p.add_argument("--api-key", help="clients must send the header Authorization: Bearer API_KEY (every route but "
                                     "/health)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (https://host:port, or * for any) call the server (CORS; "
                        "repeatable); by default browsers let no page read its answers")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_sampling_flags(parser, args)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: expected 0 (a free port) to 65535")
    if not (math.isfinite(args.max_body_mb) and args.max_body_mb > 0):
        parser.error(f"--max-body-mb {args.max_body_mb}: expected a positive number")
    if args.max_images < 0:
        parser.error(f"--max-images {args.max_images}: expected 0 or more")
    if args.max_batch < 1:
        parser.error(f"--max-batch {args.max_batch}: expected 1 or more")
    if args.max_model_len is not None and args.max_model_len < 2:
        parser.error(f"--max-model-len {args.max_model_len}: expected 2 or more (a prompt token and an answer's)")
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key: expected a non-empty key")
    folder = Path(args.allow_local_images) if args.allow_local_images else None
    if folder is not None and not folder.is_dir():
        parser.error(f"--allow-local-images {args.allow_local_images}: no such folder")
    try:   # the files are read and checked here; the weights load once the server listens
        session = Session(args.model, args.device, args.dtype, args.compile, args.tokenizer, args.mmproj,
                          args.quant_math)
        session.sampling = flag_sampling(args, session.sampling)
        if args.max_model_len is not None and args.max_model_len > session.context:
            raise InputError(f"--max-model-len {args.max_model_len}: more than the model's context of "
                             f"{session.context} tokens")
    except InputError as e:
        print(f"error: {as_flags(parser, str(e))}", file=sys.stderr)
        return 2
    limits = Limits(int(args.max_body_mb * 2**20), args.max_images, folder)
    try:
        server = Server(session, args.served_model_name or args.model, limits, args.host, args.port, args.seed,
                        args.max_batch, args.max_model_len, args.api_key, tuple(args.allow_origin))
    except OSError as e:   # the port in use, an unknown host, ...
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}; loading the model (/health answers 503 until it is ready)...",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    if isinstance(server.load_error, InputError):
        print(f"error: {as_flags(parser, str(server.load_error))}", file=sys.stderr)
        return 2
    if server.load_error is not None:   # a bug: its traceback
        raise server.load_error
    return 0


if __name__ == "__main__":
    sys.exit(main())
