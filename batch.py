"""Continuous batching: answers that share the model, each one what it would be alone.

    engine = Engine(session, max_batch=8)
    sequence = engine.submit(ids, images, sampling, seed)     # from any thread; refused if it cannot fit
    for step in sequence.steps():                              # generate.Step, one per token
        ...                                                    # leaving the loop cancels the answer
    engine.close()

One thread owns the model. Its KV cache is static: `max_batch` rows, one per sequence, each at its own
position. Between two decoding steps the thread admits the prompts that came in (while rows are free),
prefilling each one alone (generate.prefill, the single-sequence path) and sampling its first token;
then one decoding step runs every active sequence at once:

    tokens [B, 1]    the last token of each of the B active sequences, which hold rows 0..B-1 of the cache
    pos    [B, 1]    the position of each: they differ, so the RoPE angles [B, 1, Dh/2] and the attention
                     mask [B, 1, 1, L] are per row (model.py); L = the furthest position + 1
    logits [B, 1, V] row b sampled with sequence b's own settings and its own generator

A sequence leaves at the step it ends (</s>, its token limit) or at the first step after its consumer
left; the last row then moves into its place, so that the active sequences stay rows 0..B-1 and a step
reads the cache as a slice, never gathering rows. A newcomer is prefilled in row 0 (row 0's sequence
moves to row B first): a prefill over a batch of one writes row 0, as it does alone. The cache grows
(doubling) as the furthest sequence reaches its end, up to `max_len` positions: it takes max_batch x
the longest sequence so far, not max_batch x the context.

Each answer is the one it would get alone: its prefill is the same computation; a decoding step is the
same per row but for the float32 rounding of the batched products; sampling is per row, with the
request's own generator (a seed gives the same tokens whatever else runs). Prefills are not chunked: a
long prompt holds up the others' next step while it runs.
"""
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from generate import Sampling, Session, Stats, Step, compiled_decode_step, decode_step, prefill, sample
from inputs import InputError

MAX_BATCH = 8   # sequences answered at once, by default
GROWTH = 256    # the cache grows by at least this many positions (and at least doubles)


@dataclass
class Sequence:
    """A prompt to answer, and the queue the engine's thread sends its steps on."""
    ids: list[int]
    images: list[torch.Tensor]
    sampling: Sampling
    max_tokens: int
    seed: int | None = None
    logits: bool = False              # the raw logits in each step (generate.Step)
    prompt_logits: bool = False       # and those of the prompt's positions in the first
    out: queue.Queue = field(default_factory=queue.Queue)               # Step ..., then None, or an exception
    cancelled: threading.Event = field(default_factory=threading.Event)

    def steps(self) -> Iterator[Step]:
        """The answer's steps as they are made; leaving the loop (or closing it) cancels the rest."""
        try:
            while (item := self.out.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.cancelled.set()


@dataclass
class Row:
    """An active sequence: its row of the cache holds positions 0..pos-1; `token` goes to position pos."""
    sequence: Sequence
    token: int
    pos: int
    generator: torch.Generator | None
    stats: Stats
    start: float


class Engine:
    """The thread that runs the model for every request (see the module docstring). max_len: the
    positions one sequence may take, prompt and answer (default: the model's context). The session's
    model is the engine's: nothing else may run it while the engine is open."""

    def __init__(self, session: Session, max_batch: int = MAX_BATCH, max_len: int | None = None):
        if max_batch < 1:
            raise InputError(f"max_batch is {max_batch}: expected at least 1")
        self.session, self.max_batch = session, max_batch
        self.max_len = min(max_len or session.context, session.context)
        self.stop_ids = {session.tokenizer.eos_id}
        self.incoming: queue.Queue = queue.Queue()   # submitted sequences; None closes
        self.waiting: deque[Sequence] = deque()     # taken from `incoming`, not yet admitted
        self.rows: list[Row] = []                    # rows[b] holds row b of the cache
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self.thread.start()

    def submit(self, ids: list[int], images: list[torch.Tensor], sampling: Sampling, seed: int | None = None,
               logits: bool = False, prompt_logits: bool = False) -> Sequence:
        """Queue a prompt; its answer ends after </s>, after sampling.max_tokens tokens, or at max_len."""
        if len(ids) >= self.max_len:
            raise InputError(f"the prompt is {len(ids)} tokens, and a sequence may take {self.max_len} positions "
                             f"here, prompt and answer (the model's context, or --max-model-len): no room for an answer")
        room = self.max_len - len(ids)
        sequence = Sequence(ids, images, sampling, min(sampling.max_tokens or room, room), seed, logits,
                            prompt_logits)
        self.incoming.put(sequence)
        return sequence

    def close(self):
        self.incoming.put(None)
        self.thread.join(timeout=60)

    # -- the engine's thread

    @torch.inference_mode()
    def run(self):
        while True:
            if not self.rows and not self.waiting:
                self.waiting.append(self.incoming.get())      # idle: wait for work
            while not self.incoming.empty():
                self.waiting.append(self.incoming.get())
            if self.waiting and self.waiting[-1] is None:
                return
            while self.waiting and len(self.rows) < self.max_batch:
                self.admit(self.waiting.popleft())
            if self.rows:
                self.decode()

    def admit(self, sequence: Sequence):
        """Prefill a newcomer in row 0 and sample its first token; a failure is its own."""
        if sequence.cancelled.is_set():   # left while it waited
            sequence.out.put(None)
            return
        generator = None if sequence.seed is None else torch.Generator(self.device()).manual_seed(sequence.seed)
        row = Row(sequence, 0, len(sequence.ids), generator, Stats(prompt_tokens=len(sequence.ids)),
                  time.perf_counter())
        try:
            self.reserve(len(sequence.ids))
            self.rows.append(row)
            if len(self.rows) > 1:            # row 0's sequence moves to the free row
                self.move(0, len(self.rows) - 1)
                self.rows[0], self.rows[-1] = row, self.rows[0]
            out = prefill(self.session.load(), sequence.ids, self.session.on_device(sequence.images),
                          all_logits=sequence.prompt_logits)                          # [1, S or 1, V]
            token = int(sample(out[:, -1], sequence.sampling, generator))
        except Exception as e:   # bad input (images), a bug: this request's error; the others go on
            sequence.out.put(e)
            admitted = next((b for b, other in enumerate(self.rows) if other is row), None)
            if admitted is not None:
                self.leave(admitted)
            return
        self.advance(0, token, out[0])

    def decode(self):
        """One step for every active row; a failure is every active request's."""
        for b in reversed(range(len(self.rows))):
            if self.rows[b].sequence.cancelled.is_set():   # its consumer has left
                self.leave(b)
        if not self.rows:
            return
        try:
            device = self.device()
            furthest = max(row.pos for row in self.rows)
            self.reserve(furthest + 1)
            tokens = torch.tensor([[row.token] for row in self.rows], device=device)    # [B, 1]
            pos = torch.tensor([[row.pos] for row in self.rows], device=device)         # [B, 1]
            if self.session.compile:   # a CUDA graph needs the same shapes at each step: the whole cache
                step, kv_len = compiled_decode_step(device.type), None if device.type == "cuda" else furthest + 1
            else:
                step, kv_len = decode_step, furthest + 1
            out = step(self.session.load(), tokens, pos, None, kv_len)                  # [B, 1, V]
            tokens = torch.cat([sample(out[b:b + 1, -1], row.sequence.sampling, row.generator)
                                for b, row in enumerate(self.rows)]).tolist()          # one host sync
        except Exception as e:
            for row in self.rows:
                row.sequence.out.put(e)
            self.rows = []
            return
        for row in self.rows:
            row.pos += 1
        for b in reversed(range(len(self.rows))):   # leaving moves the last row: go from the end
            self.advance(b, tokens[b], out[b])

    def advance(self, b: int, token: int, logits: torch.Tensor):
        """Row b sampled `token` from logits [n, V]: send the step; the row leaves if its answer ended."""
        row, sequence = self.rows[b], self.rows[b].sequence
        stats = row.stats
        stats.generated_tokens += 1
        elapsed = time.perf_counter() - row.start
        if stats.generated_tokens == 1:
            stats.prefill_s = elapsed
        stats.decode_s = elapsed - stats.prefill_s
        sequence.out.put(Step(token, logits if sequence.logits or sequence.prompt_logits else None, None, stats))
        row.token = token
        if token in self.stop_ids or stats.generated_tokens == sequence.max_tokens:
            self.leave(b)

    def leave(self, b: int):
        """End row b's answer and free the row: the last row moves into it."""
        self.rows[b].sequence.out.put(None)
        last = len(self.rows) - 1
        if b < last:
            self.move(last, b)
            self.rows[b] = self.rows[last]
        self.rows.pop()

    def move(self, source: int, target: int):
        """Copy the cache of the sequence in row `source` to row `target` (every layer)."""
        n = self.rows[source].pos
        for layer in self.session.load().layers:
            cache = layer.attention.cache
            cache.k[target, :, :n] = cache.k[source, :, :n]
            cache.v[target, :, :n] = cache.v[source, :, :n]

    def reserve(self, n: int):
        """A cache of max_batch rows of at least n positions, what it holds kept: grown to twice its
        length, or more if n needs it, up to max_len."""
        model = self.session.load()
        cache = model.layers[0].attention.cache
        length = cache.k.shape[2] if cache is not None and cache.k.shape[0] == self.max_batch else 0
        if n <= length:
            return
        old = [(layer.attention.cache.k, layer.attention.cache.v) for layer in model.layers] if length else []
        model.setup_cache(self.max_batch, min(self.max_len, max(2 * length, -(-n // GROWTH) * GROWTH)))
        for layer, (k, v) in zip(model.layers, old):
            layer.attention.cache.k[:, :, :length] = k
            layer.attention.cache.v[:, :, :length] = v

    def device(self) -> torch.device:
        return self.session.load().output.weight.device
