"""The HTTP side of `llada-serve`: a Starlette app over one loaded model and its `Batcher`.

  POST /v1/completions         OpenAI text completions (`api.parse_completion`)
  POST /v1/chat/completions    OpenAI chat completions, the released chat template (`api.parse_chat`)
  GET  /v1/models              the one model this process serves
  GET  /health                 200 {"status": "ok", ...} once the model is loaded
  GET  /metrics                Prometheus text (`metrics.ServerMetrics`)

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 naming the field for
a bad body (not JSON, unknown field, wrong type, out of range, prompt too long), 404 for another model's
name, 429 with Retry-After when the queue is full, 504 when `request_timeout_s` passes first (a
request still queued is dropped), 500 if the sampler fails. A client that disconnects has its request
dropped before it reaches the device; its status is counted as 499.

With `stream: true` the answer comes as Server-Sent Events: one event per reverse-process step in which
a choice committed something (`choices[0].diffusion`: step, committed answer positions, the canvas with
masks as `░`; `text` empty), then each choice's final event (`text` / `delta.content`: the whole answer,
`finish_reason`), a usage event if `stream_options.include_usage`, and `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llada_jax import serving
from llada_jax.server import api
from llada_jax.server.batcher import Batcher, QueueFull, Ticket
from llada_jax.server.metrics import ServerMetrics

CLIENT_GONE = 499  # the status counted for a request whose client disconnected (nginx's convention)


def _error(e: api.BadRequest) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _json_body(request: Request) -> Any:
  raw = await request.body()
  try:
    return json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise api.BadRequest(None, f"the body is not JSON: {e}") from None


async def _disconnected(request: Request) -> None:
  """Returns when the client goes away (the body has been read: the next ASGI message is the disconnect)."""
  while (await request.receive())["type"] != "http.disconnect":
    pass


def make_app(model: serving.LoadedModel, config: api.ServerConfig,
             log: Callable[[str], None] | None = None) -> Starlette:
  """The ASGI app; its lifespan starts and stops the batcher (run it with uvicorn)."""
  metrics = ServerMetrics(config.max_batch)
  batcher = Batcher(model, config, metrics, **({"log": log} if log else {}))
  started = int(time.time())

  def timed_out() -> api.BadRequest:
    return api.BadRequest(None, f"no answer within request_timeout_s={config.request_timeout_s}", status=504,
                          kind="timeout_error")

  def count(endpoint: str, status: int, t0: float) -> None:
    metrics.requests.labels(endpoint, str(status)).inc()
    metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

  async def answer(request: Request, endpoint: str, parse) -> Response:
    t0 = time.perf_counter()
    try:
      job = parse(await _json_body(request), model, config)
      ticket = batcher.submit(job)
    except api.BadRequest as e:
      count(endpoint, e.status, t0)
      return _error(e)
    except QueueFull as e:
      count(endpoint, 429, t0)
      return _error(api.BadRequest(None, str(e), status=429, kind="rate_limit_error",
                                   headers={"Retry-After": str(e.retry_after)}))
    if job.stream:
      return StreamingResponse(_stream(ticket, endpoint, t0), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    gone = asyncio.ensure_future(_disconnected(request))
    try:
      done, _ = await asyncio.wait({ticket.future, gone}, timeout=config.request_timeout_s,
                                   return_when=asyncio.FIRST_COMPLETED)
    finally:
      gone.cancel()
    if ticket.future in done and not ticket.future.cancelled() and ticket.future.exception() is None:
      count(endpoint, 200, t0)
      return JSONResponse(api.response_body(job, ticket.future.result(), config.model_name))
    if ticket.future in done and not ticket.future.cancelled():
      count(endpoint, 500, t0)
      return _error(api.BadRequest(None, f"the sampler failed: {ticket.future.exception()}", status=500,
                                   kind="server_error"))
    reason = "disconnected" if gone in done else "timeout"
    batcher.cancel(ticket, reason)
    if reason == "disconnected":
      count(endpoint, CLIENT_GONE, t0)
      return Response(status_code=CLIENT_GONE)
    count(endpoint, 504, t0)
    return _error(timed_out())

  async def _stream(ticket: Ticket, endpoint: str, t0: float) -> AsyncIterator[str]:
    job, status = ticket.job, CLIENT_GONE
    deadline = time.monotonic() + config.request_timeout_s
    try:
      while True:
        try:
          kind, payload = await asyncio.wait_for(ticket.events.get(), deadline - time.monotonic())
        except asyncio.TimeoutError:
          batcher.cancel(ticket, "timeout")
          status = 504
          yield f"data: {json.dumps(timed_out().body())}\n\n"
          break
        if kind == "step":
          yield f"data: {json.dumps(payload)}\n\n"
          continue
        for choice in payload:
          yield f"data: {json.dumps(api.final_chunk(job, config.model_name, choice))}\n\n"
        if job.include_usage:
          yield f"data: {json.dumps(api.usage_chunk(job, config.model_name, payload))}\n\n"
        status = 200
        break
      yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects (Starlette cancels this generator)
      if status == CLIENT_GONE:
        batcher.cancel(ticket, "disconnected")
      count(endpoint, status, t0)

  async def completions(request: Request) -> Response:
    return await answer(request, "completions", api.parse_completion)

  async def chat(request: Request) -> Response:
    return await answer(request, "chat", api.parse_chat)

  async def models(request: Request) -> Response:
    del request
    return JSONResponse({"object": "list", "data": [{
        "id": config.model_name, "object": "model", "created": started, "owned_by": "llada_jax",
        "max_model_len": model.model_config.max_seq_len, "chat": model.chat, "step": model.step}]})

  async def health(request: Request) -> Response:
    del request
    return JSONResponse({"status": "ok", "model": config.model_name, "queue_depth": batcher.queue_depth})

  async def prometheus(request: Request) -> Response:
    del request
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    batcher.start()
    try:
      yield
    finally:  # uvicorn has stopped listening and finished the requests in flight (SIGTERM: the drain)
      await batcher.stop()
      if log:
        log("llada-serve: stopped (requests in flight answered)")

  return Starlette(routes=[
      Route("/v1/completions", completions, methods=["POST"]),
      Route("/v1/chat/completions", chat, methods=["POST"]),
      Route("/v1/models", models, methods=["GET"]),
      Route("/health", health, methods=["GET"]),
      Route("/metrics", prometheus, methods=["GET"]),
  ], lifespan=lifespan)
