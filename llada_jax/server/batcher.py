"""Dynamic batching of the reverse process: concurrent requests that compile to the same program share
one sampler call.

Requests wait in a bounded queue (`ServerConfig.max_queue`; a full queue is `QueueFull`, the server's
429). One task on the event loop forms batches: the oldest waiting request opens a batch and waits up
to `batch_timeout_ms` for companions while the device is idle (while it is busy, requests pile up and
the next batch forms at once); every waiting request with the same sampler options (`Job.cfg`: canvas,
steps, block length, remasking, ...) joins, oldest first, up to `max_batch` rows. Requests whose
client went away or whose time ran out are dropped then, before they reach the device.

Shapes are bucketed so few programs compile: the prompts are left-padded to the first of
`prompt_buckets` that holds the longest (capped at what the canvas leaves of the model's sequence), and
the rows to the next power of two (at most `max_batch`), padding rows repeating the first. A row draws
its random numbers from its own key (`fold_in(key(seed), choice)`), never from its batch, so it reads
as a lone `llada-sample` call would. Every new program (options x prompt width x rows x streaming) is
logged and counted.

The sampler runs in one worker thread, off the event loop. A batch with a streaming request compiles its
program with an observer (`sampling.generate(observe=...)`): after every step the device hands the
sequence to the host, which sends each streaming choice the positions it just committed and its canvas.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from llada_jax import sampling, serving
from llada_jax.server import api
from llada_jax.server.metrics import ServerMetrics


class QueueFull(Exception):
  """The waiting queue holds `max_queue` requests; `retry_after` (seconds) estimates when it drains."""

  def __init__(self, retry_after: int):
    super().__init__(f"the server's queue is full; retry in {retry_after} s")
    self.retry_after = retry_after


@dataclasses.dataclass
class Ticket:
  """A submitted request: its answer (`future`: a list of `api.Choice`), its stream of events (`events`:
  ("step", chunk) then ("result", choices), for streaming jobs) and whether it was cancelled."""

  job: api.Job
  future: asyncio.Future
  events: asyncio.Queue | None
  enqueued: float
  cancelled: str | None = None  # why: "disconnected" | "timeout"


@dataclasses.dataclass
class _Row:
  ticket: Ticket
  choice: int
  answer: np.ndarray | None = None  # last canvas seen (streaming)


class Batcher:

  def __init__(self, model: serving.LoadedModel, config: api.ServerConfig, metrics: ServerMetrics,
               log: Callable[[str], None] = logging.info):
    self.model, self.config, self.metrics, self.log = model, config, metrics, log
    self.prompt_buckets, _ = config.buckets(model.model_config.max_seq_len)
    self._pending: collections.deque[Ticket] = collections.deque()
    self._wake = asyncio.Event()
    self._device = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llada-device")
    self._programs: set[tuple[Any, ...]] = set()
    self._streaming: list[tuple[int, _Row]] = []  # (batch row, row) of the call in flight
    self._width = 0
    self._observe = self._on_step  # one object: the observed program compiles once per shape
    self._last_batch_s = 1.0
    self._loop: asyncio.AbstractEventLoop | None = None
    self._task: asyncio.Task | None = None

  # --- The event-loop side -------------------------------------------------------------------------------

  def start(self) -> None:
    self._loop = asyncio.get_running_loop()
    self._task = self._loop.create_task(self._run())

  async def stop(self) -> None:
    """Fails what still waits (a drain that timed out), stops the loop and the worker thread."""
    for ticket in self._pending:
      if not ticket.future.done():
        ticket.future.set_exception(RuntimeError("the server is shutting down"))
    self._pending.clear()
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
    self._device.shutdown(wait=True)

  @property
  def queue_depth(self) -> int:
    return len(self._pending)

  def submit(self, job: api.Job) -> Ticket:
    if len(self._pending) >= self.config.max_queue:
      waits = len(self._pending) / self.config.max_batch + 1
      raise QueueFull(max(1, math.ceil(waits * self._last_batch_s)))
    ticket = Ticket(job, self._loop.create_future(), asyncio.Queue() if job.stream else None, time.monotonic())
    self._pending.append(ticket)
    self.metrics.queue_depth.set(len(self._pending))
    self._wake.set()
    return ticket

  def cancel(self, ticket: Ticket, reason: str) -> None:
    """The client went away ("disconnected") or its time ran out ("timeout"): a waiting request leaves
    the queue now and never reaches the device; one on the device has its answer (and its stream) dropped."""
    if ticket.cancelled or ticket.future.done():
      return
    ticket.cancelled = reason
    if ticket in self._pending:
      self._pending.remove(ticket)
      self.metrics.queue_depth.set(len(self._pending))
      self.metrics.dropped.labels(reason).inc()
      ticket.future.cancel()
      self._wake.set()

  async def _run(self) -> None:
    while True:
      batch = await self._next_batch()
      if batch:
        await self._serve(batch)

  def _rows_like(self, first: Ticket) -> int:
    return sum(t.job.rows for t in self._pending if t.job.cfg == first.job.cfg)

  async def _next_batch(self) -> list[Ticket]:
    while not self._pending:
      self._wake.clear()
      await self._wake.wait()
    first = self._pending[0]
    deadline = first.enqueued + self.config.batch_timeout_ms / 1000
    while self._pending and self._pending[0] is first and self._rows_like(first) < self.config.max_batch:
      left = deadline - time.monotonic()
      if left <= 0:
        break
      self._wake.clear()
      try:
        await asyncio.wait_for(self._wake.wait(), left)
      except asyncio.TimeoutError:
        break
    if not self._pending:
      return []
    first, batch, rows = self._pending[0], [], 0
    for ticket in list(self._pending):
      if ticket.job.cfg == first.job.cfg and rows + ticket.job.rows <= self.config.max_batch:
        batch.append(ticket)
        rows += ticket.job.rows
        self._pending.remove(ticket)
    self.metrics.queue_depth.set(len(self._pending))
    return batch

  async def _serve(self, batch: list[Ticket]) -> None:
    rows = [_Row(t, c) for t in batch for c in range(t.job.rows)]
    cfg = batch[0].job.cfg
    self.metrics.running_rows.set(len(rows))
    try:
      tokens, steps, width, seconds = await self._loop.run_in_executor(self._device, self._call, batch, rows,
                                                                       cfg)
    except Exception as e:  # noqa: BLE001 -- every waiting client gets the error, the server goes on
      logging.exception("sampler call failed")
      for t in batch:
        if not t.future.done():
          t.future.set_exception(e)
      return
    finally:
      self.metrics.running_rows.set(0)
    self._last_batch_s = seconds
    generated = 0
    for t in batch:
      mine = [k for k, r in enumerate(rows) if r.ticket is t]
      choices = [api.choice_result(t.job, rows[k].choice, tokens[k, width:], int(steps[k]), self.model.tokenizer)
                 for k in mine]
      generated += sum(c.tokens for c in choices)
      if t.events is not None:
        t.events.put_nowait(("result", choices))
      if not t.future.done():
        t.future.set_result(choices)
    self.metrics.batch_size.observe(len(rows))
    self.metrics.batch_seconds.observe(seconds)
    self.metrics.tokens.inc(generated)
    self.metrics.tokens_per_second.set(generated / max(seconds, 1e-9))

  # --- The device side (the worker thread) ---------------------------------------------------------------

  def _shape(self, rows: list[_Row], cfg) -> tuple[int, int]:
    """(prompt width, padded row count) of a batch: the buckets that hold it."""
    longest = max(len(r.ticket.job.row_prompt(r.choice)) for r in rows)
    L, bs = self.model.model_config.max_seq_len, self.model.block_size
    room = (L // bs * bs if bs else L) - cfg.gen_length  # >= longest: api checked each prompt (a block model's
    # canvas is whole blocks: prompt width + gen_length rounded up must stay within max_seq_len)
    width = min(next((b for b in self.prompt_buckets if b >= longest), longest), room)
    return width, min(1 << (len(rows) - 1).bit_length(), self.config.max_batch)

  def _call(self, batch: list[Ticket], rows: list[_Row], cfg) -> tuple[np.ndarray, np.ndarray, int, float]:
    width, padded = self._shape(rows, cfg)
    all_rows = rows + [rows[0]] * (padded - len(rows))
    prompts = [r.ticket.job.row_prompt(r.choice) for r in all_rows]
    # Each job's rows draw what rows 0..rows-1 of `llada-sample --seed=SEED` draw (the sampler's own rule);
    # padding rows repeat the first row.
    keys = jnp.concatenate([sampling.row_keys(jax.random.key(t.job.seed), t.job.rows) for t in batch])
    keys = keys[np.asarray(list(range(len(rows))) + [0] * (padded - len(rows)))]
    stream = any(r.ticket.job.stream for r in rows)
    program = (cfg, width, padded, stream)
    if program not in self._programs:
      self._programs.add(program)
      self.metrics.programs.set(len(self._programs))
      self.log(f"llada-serve: compiling sampler program #{len(self._programs)}: {padded} rows x prompt width "
               f"{width}{', streaming' if stream else ''}, {cfg}")
    self._width = width
    self._streaming = [(k, r) for k, r in enumerate(rows) if r.ticket.job.stream]
    options = dataclasses.asdict(cfg)
    start = time.perf_counter()
    try:
      out = self.model.generate_ids(prompts, rng=keys, width=width, observe=self._observe if stream else None,
                                    **options)
      tokens, steps = np.asarray(out.tokens_BL), np.asarray(out.steps_B)
      if stream:
        jax.effects_barrier()  # every step's callback has run
    finally:
      self._streaming = []
    return tokens, steps, width, time.perf_counter() - start

  def _on_step(self, step, x_BL) -> None:
    """Runs on the host after every reverse-process step of a streaming batch (a runtime thread)."""
    x_BL = np.asarray(x_BL)
    mask_id, tok = self.model.mask_id, self.model.tokenizer
    for k, row in self._streaming:
      t = row.ticket
      if t.cancelled:
        continue
      answer = x_BL[k, self._width:self._width + t.job.max_tokens]
      before = row.answer if row.answer is not None else np.full_like(answer, mask_id)
      committed = np.flatnonzero((before == mask_id) & (answer != mask_id))
      row.answer = answer.copy()
      if committed.size:
        chunk = api.step_chunk(t.job, self.config.model_name, row.choice, int(step), committed.tolist(),
                               api.canvas_text(t.job, answer, mask_id, tok))
        self._loop.call_soon_threadsafe(t.events.put_nowait, ("step", chunk))
