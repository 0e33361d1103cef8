"""`llada-serve` under load: requests/s, tokens/s and latency against concurrency, batching on and off.

  pip install -e ".[serve]" httpx
  python benchmarks/serve_load.py --workdir=/tmp/llada_demo                       # CPU, the demo model
  python benchmarks/serve_load.py --workdir=/tmp/llada_8b --max_batches=32,1 --max_tokens=256 \\
      --body='{"block_length": 32, "threshold": 0.9}'                             # an accelerator

For each --max_batches value (1 = batching off) a server process is started on the workdir; at each
concurrency level, that many clients send --requests_per_client completions each, back to back (prompts
cycle through a fixed list of different lengths), after the same round untimed, which compiles the
programs it needs (the server compiles one per options x prompt-width bucket x row bucket). Per row:
requests/s, completion tokens/s (answers cut at EOS), canvas positions decoded per second (each
request's canvas, EOS padding included: the sampler's work), p50 / p99 latency (client side), and the
mean rows per sampler call the server's /metrics report for the round.
"""

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a trained or converted model.")
_CONCURRENCY = flags.DEFINE_list("concurrency", ["1", "4", "16", "64"], "Concurrent clients, per row.")
_MAX_BATCHES = flags.DEFINE_list("max_batches", ["16", "1"], "Server --max_batch values (1: batching off).")
_PER_CLIENT = flags.DEFINE_integer("requests_per_client", 4, "Requests each client sends in a timed round.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "max_tokens of every request.")
_BODY = flags.DEFINE_string("body", '{"block_length": 8}', "Extra JSON fields of every request.")
_TIMEOUT_MS = flags.DEFINE_float("batch_timeout_ms", 10.0, "Server --batch_timeout_ms.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")

PROMPTS = ["the capital of", "a cat sat on the", "once upon a time there was a", "what is three plus four",
           "the river runs", "count: 1 2 3 4 5 6 7", "in the north of the old kingdom, the people of",
           "tell me about"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(max_batch: int) -> tuple[subprocess.Popen, str]:
  port = _free_port()
  proc = subprocess.Popen([sys.executable, "-m", "llada_jax.cli.serve", f"--workdir={_WORKDIR.value}",
                           f"--port={port}", f"--max_batch={max_batch}", "--max_queue=4096",
                           f"--batch_timeout_ms={_TIMEOUT_MS.value}", "--request_timeout_s=3600"],
                          stderr=subprocess.PIPE, text=True)
  url = f"http://127.0.0.1:{port}"
  for _ in range(600):
    if proc.poll() is not None:
      raise RuntimeError(f"llada-serve exited: {proc.stderr.read()[-2000:]}")
    try:
      if httpx.get(url + "/health", timeout=1).status_code == 200:
        return proc, url
    except httpx.TransportError:
      time.sleep(0.5)
  raise RuntimeError("llada-serve did not come up")


def _metric(url: str, name: str) -> float:
  text = httpx.get(url + "/metrics", timeout=30).text
  m = re.search(rf"^{name} (\S+)$", text, re.M)
  return float(m.group(1)) if m else 0.0


async def _round(url: str, clients: int, per_client: int, extra: dict) -> tuple[list[float], int, int, float]:
  """(latencies, completion tokens, canvas positions decoded, wall seconds) of one round."""
  latencies, tokens, canvas = [], 0, 0

  async def client(k: int, http: httpx.AsyncClient) -> None:
    nonlocal tokens, canvas
    for j in range(per_client):
      body = {"prompt": PROMPTS[(k * per_client + j) % len(PROMPTS)], "max_tokens": _MAX_TOKENS.value, **extra}
      t0 = time.perf_counter()
      r = await http.post(url + "/v1/completions", json=body)
      r.raise_for_status()
      latencies.append(time.perf_counter() - t0)
      tokens += r.json()["usage"]["completion_tokens"]
      canvas += r.json()["diffusion"]["gen_length"]

  limits = httpx.Limits(max_connections=clients + 4)
  async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
    t0 = time.perf_counter()
    await asyncio.gather(*(client(k, http) for k in range(clients)))
    return latencies, tokens, canvas, time.perf_counter() - t0


def main(argv):
  del argv
  logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
  extra = json.loads(_BODY.value)
  rows = []
  header = (f"{'max_batch':>9} {'clients':>7} {'requests':>8} {'req/s':>8} {'tokens/s':>9} {'canvas/s':>9} "
            f"{'p50 s':>7} {'p99 s':>7} {'rows/call':>9} {'programs':>8}")
  print(f"workdir {_WORKDIR.value}; max_tokens {_MAX_TOKENS.value}; body {extra}; "
        f"{_PER_CLIENT.value} requests per client")
  print(header)
  for max_batch in map(int, _MAX_BATCHES.value):
    proc, url = _start(max_batch)
    try:
      for clients in map(int, _CONCURRENCY.value):
        asyncio.run(_round(url, clients, _PER_CLIENT.value, extra))  # compiles this level's programs
        calls0, rows0 = _metric(url, "llada_batch_size_count"), _metric(url, "llada_batch_size_sum")
        latencies, tokens, canvas, wall = asyncio.run(_round(url, clients, _PER_CLIENT.value, extra))
        calls = _metric(url, "llada_batch_size_count") - calls0
        row = {"max_batch": max_batch, "clients": clients, "requests": len(latencies),
               "requests_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall,
               "canvas_tokens_per_s": canvas / wall,
               "p50_s": float(np.percentile(latencies, 50)), "p99_s": float(np.percentile(latencies, 99)),
               "rows_per_call": (_metric(url, "llada_batch_size_sum") - rows0) / max(calls, 1),
               "programs": int(_metric(url, "llada_compiled_programs"))}
        rows.append(row)
        print(f"{max_batch:>9} {clients:>7} {row['requests']:>8} {row['requests_per_s']:>8.2f} "
              f"{row['tokens_per_s']:>9.1f} {row['canvas_tokens_per_s']:>9.1f} {row['p50_s']:>7.2f} "
              f"{row['p99_s']:>7.2f} {row['rows_per_call']:>9.2f} {row['programs']:>8}", flush=True)
    finally:
      proc.terminate()
      proc.wait(timeout=120)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"workdir": os.path.abspath(_WORKDIR.value), "body": extra, "max_tokens": _MAX_TOKENS.value,
                 "rows": rows}, f, indent=2)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
