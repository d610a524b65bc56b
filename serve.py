"""An OpenAI-compatible server for one model, on the Python standard library alone.

    python serve.py --model mistralai/Mistral-Small-3.2-24B-Instruct-2506 --port 8000

    GET  /v1/models             the one model served
    GET  /health                200 once the model is loaded
    POST /v1/chat/completions   answers, streamed or not: tools, images, stop strings, logprobs, usage
    POST /tokenize              a conversation -> its prompt ids and image grids (to diff runtimes)

Threads: http.server gives each connection a thread, which reads and checks the request and encodes
the conversation (fetching and preprocessing its images); the prompt then goes through a queue to the
one thread that owns the model (as in mlx-lm's server), which answers one request at a time and sends
each request's tokens back through a queue of that request's own.
"""
import argparse
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
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from chat import CALL_ID, OutputStream, ToolCall, image_slots, new_call_id, parse_output, partial_suffix
from generate import (SAMPLING_RANGES, Sampling, Session, Step, add_model_flags, add_sampling_flags,
                      check_sampling_flags, flag_sampling)
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


def read_request(body: dict, card: Sampling, default_seed: int | None) -> Request:
    """The chat completion request's fields, checked; unknown fields are ignored, as OpenAI clients
    send some that do not apply here (user, metadata, ...)."""
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
    return Request(
        messages=body.get("messages"), tools=option(body, "tools", list, "a list of tools"),
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
    """One answer as it is generated, on the model thread: the thought and the content read from the ids
    as they come (chat.OutputStream), the content cut at a stop string and held back where one may begin
    (stop strings apply to the content, not the thought); the logprobs."""

    def __init__(self, tokenizer, request: Request, reasoning: bool):
        self.tokenizer, self.request, self.tags = tokenizer, request, reasoning
        self.output = OutputStream(tokenizer, tags=reasoning)
        self.text, self.sent = "", 0         # the content so far, and how much of it was sent
        self.thought = ""
        self.stopped = False
        self.ids: list[int] = []
        self.logprobs: list[dict] = []

    def add(self, step: Step) -> Delta:
        """A generated token -> what to send for it."""
        self.ids.append(step.token)
        entries = [self.logprob(step.token, step.logits[-1])] if self.request.top_logprobs is not None else []
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

    def logprob(self, token: int, logits: torch.Tensor) -> dict:
        """The entry of `token` sampled from logits [V] (raw: logprobs before temperature)."""
        logprobs = logits.float().log_softmax(-1)
        top = logprobs.topk(self.request.top_logprobs) if self.request.top_logprobs else None
        entry = self.token_entry(token, logprobs[token].item())
        entry["top_logprobs"] = [] if top is None else [
            self.token_entry(i, lp) for i, lp in zip(top.indices.tolist(), top.values.tolist())]
        return entry

    def token_entry(self, token: int, logprob: float) -> dict:
        special = self.tokenizer.is_special(token)
        data = self.tokenizer.special_name(token).encode() if special else self.tokenizer.token_bytes(token)
        text = f"token_id:{token}" if self.request.token_ids else data.decode("utf-8", errors="replace")
        return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(data)}

    def finish(self, prompt_tokens: int) -> tuple[Delta, Final]:
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
        return last, Final(self.text, thought, calls, finish, usage, self.logprobs)


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
    """An encoded request for the model thread, which answers on `events` (Delta ..., then Done or Failed)."""
    ids: list[int]
    images: list[torch.Tensor]
    request: Request
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)   # set when the client is gone

    def run(self, session: Session):
        try:
            answer = Answer(session.tokenizer, self.request, session.reasoning)
            for step in session.stream(self.ids, self.images, self.request.sampling, self.request.seed,
                                       logits=self.request.top_logprobs is not None):
                if self.cancelled.is_set():  # the client is gone
                    break
                self.events.put(answer.add(step))
                if answer.stopped:
                    break
            last, final = answer.finish(len(self.ids))
            self.events.put(last)
            self.events.put(Done(final))
        except Exception as e:   # reported by the request's thread; the model thread goes on
            self.events.put(Failed(e))


class ModelThread:
    """The one thread that runs the model: it answers the queued jobs one at a time."""

    def __init__(self, session: Session):
        self.session, self.jobs = session, queue.Queue()
        self.thread = threading.Thread(target=self.run, name="model", daemon=True)
        self.thread.start()

    def run(self):
        while (job := self.jobs.get()) is not None:
            if not job.cancelled.is_set():
                job.run(self.session)

    def close(self):
        self.jobs.put(None)
        self.thread.join(timeout=60)


# ----------------------------------------------------------------------------- HTTP

class Server(ThreadingHTTPServer):
    # Connection threads are joined on close (server_close), not left running while Python exits: a
    # thread still alive then can abort the process ("terminate called without an active exception").
    daemon_threads = False

    def __init__(self, session: Session, model_id: str, limits: Limits | None = None, host: str = "127.0.0.1",
                 port: int = 8000, default_seed: int | None = None):
        super().__init__((host, port), Handler)
        self.session, self.model_id, self.default_seed = session, model_id, default_seed
        self.limits = limits or Limits()
        self.created = int(time.time())
        self.model_thread = ModelThread(session)
        self.connections: set[socket.socket] = set()   # open client connections, ended on close
        self.connections_lock = threading.Lock()

    def process_request_thread(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.connections.discard(request)

    def close(self):
        """Stop accepting, end every open connection (an idle keep-alive one, a stream: its job is then
        cancelled), wait for their threads, then for the model thread."""
        self.shutdown()
        with self.connections_lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:   # already closed by the client
                    pass
        self.server_close()
        self.model_thread.close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"    # keep-alive, as the openai client expects
    timeout = 300                    # seconds a connection may sit idle
    server: Server

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def route(self, method: str):
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        length = self.headers.get("Content-Length", "")
        # bytes of the body not read yet; fullmatch, not isdigit, which takes "²" too
        self.unread = int(length) if re.fullmatch(r"[0-9]{1,18}", length) else 0
        try:
            handler = ROUTES.get((method, path))
            if handler is None:
                raise HTTPError(404, f"unknown route: {method} {path}", code="unknown_url")
            handler(self)
        except DISCONNECTED:
            self.close_connection = True
        except Exception as e:
            self.send_error_json(e)

    def send_error_json(self, e: Exception):
        status, body = error_body(e)
        self.close_connection = True
        self.skip_body()
        if status >= 500:
            traceback.print_exception(e)   # a bug: its traceback on the server's stderr
        self.send_json(status, body)

    def send_json(self, status: int, body: dict):
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

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
        self.send_json(200, {"status": "ok"})

    def tokenize(self):
        """{messages, tools} -> {tokens, count, max_model_len, images: [[rows, cols], ...]} (vLLM's keys)."""
        body = self.read_body()
        check_images(body.get("messages"), self.server.limits)
        session = self.server.session
        ids, images = session.encode(body.get("messages"), option(body, "tools", list, "a list of tools"))
        config = session.tokenizer.image
        grids = [list(token_grid(im, config.patch_size, config.spatial_merge_size)) for im in images]
        self.send_json(200, {"tokens": ids, "count": len(ids), "max_model_len": session.context, "images": grids})

    def chat_completions(self):
        body = self.read_body()
        request = read_request(body, self.server.session.sampling, self.server.default_seed)
        check_images(request.messages, self.server.limits)
        job = Job(*self.server.session.encode(request.messages, request.tools), request)
        self.server.model_thread.jobs.put(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.server.model_id}
        event = job.events.get()
        if isinstance(event, Failed):        # before any token: an ordinary error response
            raise event.error
        if request.stream:
            self.stream(job, head, event)
            return
        while not isinstance(event, Done):
            event = job.events.get()
            if isinstance(event, Failed):
                raise event.error
        final = event.final
        message = {"role": "assistant", "content": final.content if final.content or not final.tool_calls else None,
                   "tool_calls": final.tool_calls or None, **reasoning_fields(final.reasoning)}
        choice = {"index": 0, "message": message, "finish_reason": final.finish_reason,
                  "logprobs": {"content": final.logprobs} if request.top_logprobs is not None else None}
        self.send_json(200, {**head, "object": "chat.completion", "choices": [choice], "usage": final.usage})

    def stream(self, job: Job, head: dict, event: Delta | Done | Failed):
        """Server-sent events: a role delta, content deltas, tool-call deltas, the finish reason, the
        usage (if asked), [DONE]. A client that goes away cancels its job."""
        request = job.request
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")   # the stream's end is the connection's
        self.end_headers()
        self.close_connection = True

        def send(data: dict | str):
            self.wfile.write(f"data: {json.dumps(data, ensure_ascii=False) if isinstance(data, dict) else data}\n\n"
                             .encode())
            self.wfile.flush()

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
                if status >= 500:
                    traceback.print_exception(event.error)
                send(body)
            else:
                final = event.final
                for i, call in enumerate(final.tool_calls):   # the call, then its arguments
                    send(chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                                "function": {"name": call["function"]["name"], "arguments": ""}}]}))
                    send(chunk({"tool_calls": [{"index": i, "function": {"arguments": call["function"]["arguments"]}}]}))
                send(chunk({}, finish=final.finish_reason))
                if request.include_usage:
                    send({**head, "object": "chat.completion.chunk", "choices": [], "usage": final.usage})
            send("[DONE]")
        except DISCONNECTED:
            job.cancelled.set()   # the model thread stops at the next token and takes the next job


ROUTES = {("GET", "/v1/models"): Handler.models, ("GET", "/health"): Handler.health,
          ("POST", "/v1/chat/completions"): Handler.chat_completions, ("POST", "/tokenize"): Handler.tokenize}


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
    folder = Path(args.allow_local_images) if args.allow_local_images else None
    if folder is not None and not folder.is_dir():
        parser.error(f"--allow-local-images {args.allow_local_images}: no such folder")
    try:
        session = Session(args.model, args.device, args.dtype, args.compile, args.tokenizer, args.mmproj)
        session.sampling = flag_sampling(args, session.sampling)
        session.load()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    limits = Limits(int(args.max_body_mb * 2**20), args.max_images, folder)
    try:
        server = Server(session, args.served_model_name or args.model, limits, args.host, args.port, args.seed)
    except OSError as e:   # the port in use, an unknown host, ...
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"serving {server.model_id} on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
