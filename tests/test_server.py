"""`llada-serve`: real server processes on 127.0.0.1, driven by the `openai` client and by `httpx`.

Servers over conftest's shared SFT workdir (a chat model): `server` (max_batch 8, a 300 ms batching
window) answers the equality, concurrency, streaming and bad-input tests; one with a 1 s request timeout
the timeout test; `small` (max_batch 1, a queue of 2) the overflow, disconnect and SIGTERM test.
"""

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

import cli_forks
from conftest import command_env
from llada_jax import serving
from llada_jax.server import api

NAME = "tiny-chat"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """`python -m llada_jax.cli.serve` on a free port, ready once /health answers."""

  def __init__(self, workdir: str, log: str, *flags: str):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = log  # its stderr, in a file: a pipe nobody reads could fill and stall the server
    with open(log, "w") as err:
      self.proc = subprocess.Popen([sys.executable, "-m", "llada_jax.cli.serve", f"--workdir={workdir}",
                                    f"--port={self.port}", f"--model_name={NAME}", *flags],
                                   env=command_env(1), stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      assert self.proc.poll() is None, self.stderr()[-3000:]
      try:
        if httpx.get(self.url + "/health", timeout=1).status_code == 200:
          return
      except httpx.TransportError:
        time.sleep(0.2)
    raise AssertionError("llada-serve did not come up in 120 s")

  def openai(self) -> openai.OpenAI:
    return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

  def post(self, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(self.url + path, content=content, timeout=kw.pop("timeout", 120), **kw)

  def metric(self, name: str, **labels) -> float:
    """The value of one series of GET /metrics (0 if absent)."""
    text = httpx.get(self.url + "/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
      m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
      if m and (m.group(1) or "") == want:
        return float(m.group(2))
    return 0.0

  def stderr(self) -> str:
    with open(self.log) as f:
      return f.read()

  def stop(self) -> tuple[int, str]:
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait(timeout=60)
    return self.proc.returncode, self.stderr()


def _serving(workdir, tmp_path_factory, *flags):
  s = Server(workdir, str(tmp_path_factory.mktemp("server") / "stderr.txt"), *flags)
  yield s
  s.stop()


@pytest.fixture(scope="module")
def server(sft_workdir, tmp_path_factory):
  yield from _serving(sft_workdir, tmp_path_factory, "--max_batch=8", "--batch_timeout_ms=300")


@pytest.fixture(scope="module")
def small(sft_workdir, tmp_path_factory):
  yield from _serving(sft_workdir, tmp_path_factory, "--max_batch=1", "--max_queue=2", "--batch_timeout_ms=0")


def _sample(workdir, tmp_path, *args) -> list[str]:
  """What `llada-sample` answers (the texts of --output_json)."""
  out = tmp_path / "sample.json"
  r = cli_forks.shared().run("llada_jax.cli.sample", [f"--workdir={workdir}", f"--output_json={out}", *args])
  assert r.returncode == 0, r.stderr[-2000:]
  return [row["text"] for row in json.loads(out.read_text())]


def test_completions_and_chat_equal_llada_sample(server, sft_workdir, tmp_path):
  client = server.openai()
  got = client.completions.create(model=NAME, prompt="the capital of", max_tokens=16, temperature=0.8, seed=5,
                                  n=2, extra_body={"block_length": 8})
  want = _sample(sft_workdir, tmp_path, "--prompt=the capital of", "--prompt=the capital of", "--chat=false",
                 "--gen_length=16", "--block_length=8", "--temperature=0.8", "--seed=5")
  assert [c.text for c in got.choices] == want
  assert got.choices[0].text != got.choices[1].text  # choice c draws from fold_in(key(seed), c)
  assert got.model_extra["diffusion"] == {"gen_length": 16, "steps": 16, "block_length": 8}
  chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "what is 2 plus 2?"}],
                                        max_tokens=16, extra_body={"remasking": "margin"})
  want = _sample(sft_workdir, tmp_path, "--prompt=what is 2 plus 2?", "--chat=true", "--gen_length=16",
                 "--remasking=margin")
  assert chat.choices[0].message.content == want[0] and chat.choices[0].message.role == "assistant"
  assert chat.usage.completion_tokens <= 16 and chat.usage.prompt_tokens > 5
  models = client.models.list()
  assert [m.id for m in models.data] == [NAME]


def test_concurrent_requests_are_batched_and_answer_as_alone(server, sft_workdir):
  prompts = [f"count {' '.join(map(str, range(k % 7 + 1)))}" for k in range(32)]
  before = server.metric("llada_batch_size_count"), server.metric("llada_batch_size_sum")
  body = lambda p: {"model": NAME, "prompt": p, "max_tokens": 8, "block_length": 4, "steps": 8}
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    answers = list(pool.map(lambda p: server.post("/v1/completions", body(p)), prompts))
  assert [a.status_code for a in answers] == [200] * 32
  calls = server.metric("llada_batch_size_count") - before[0]
  rows = server.metric("llada_batch_size_sum") - before[1]
  assert rows == 32 and calls < 32, (calls, rows)  # some calls held several requests
  # Each answer is what a lone call with the prompt's own width gives (the batch padded it wider).
  model = serving.load(sft_workdir)
  for k in (0, 3, 6):
    alone = model.complete([prompts[k]], chat=False, gen_length=8, block_length=4, steps=8)[0]
    assert answers[k].json()["choices"][0]["text"] == alone.text
  assert server.metric("llada_compiled_programs") <= 8


def test_streaming_fills_in_then_ends_with_the_final_text(server):
  client = server.openai()
  chunks = list(client.completions.create(model=NAME, prompt="the capital of", max_tokens=16, stream=True,
                                          extra_body={"block_length": 8, "steps": 8}))
  steps = [c.choices[0].model_extra["diffusion"] for c in chunks[:-1]]
  assert [s["step"] for s in steps] == sorted({s["step"] for s in steps})  # one event per step, in order
  committed = [p for s in steps for p in s["committed"]]
  assert sorted(committed) == list(range(16))  # every position once (8 steps x 2)
  assert "░" in steps[0]["canvas"] and "░" not in steps[-1]["canvas"]
  final = chunks[-1].choices[0]
  assert final.finish_reason in ("stop", "length")
  assert "".join(c.choices[0].text for c in chunks) == final.text  # a client that only wants the text
  plain = client.completions.create(model=NAME, prompt="the capital of", max_tokens=16,
                                    extra_body={"block_length": 8, "steps": 8})
  assert final.text == plain.choices[0].text
  with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120, json={
      "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True,
      "stream_options": {"include_usage": True}}) as r:
    lines = [line for line in r.iter_lines() if line]
  assert lines[-1] == "data: [DONE]"
  usage = json.loads(lines[-2][len("data: "):])
  assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 8
  last = json.loads(lines[-3][len("data: "):])["choices"][0]
  assert last["delta"]["role"] == "assistant" and last["finish_reason"] in ("stop", "length")


BAD = [
    ("not json", None),
    ("[1, 2]", None),
    ({"prompt": "x", "block_lenght": 4}, "block_lenght"),
    ({"prompt": "x", "gen_length": 8}, "gen_length"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "max_tokens": 8, "block_length": 4, "steps": 5}, "steps"),
    ({"prompt": "x", "threshold": 1.5}, "threshold"),
    ({"prompt": "x", "remasking": "sometimes"}, "remasking"),
    ({"prompt": "x", "kv_cache": True}, "kv_cache"),
    ({"prompt": "x", "steps": "8"}, "steps"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 4096}, "max_tokens"),
    ({"prompt": [5] * 4095, "max_tokens": 8}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, 10 ** 9]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "n": 9}, "n"),
    ({"prompt": "x", "seed": 2 ** 64}, "seed"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "top_p": 0.5}, "top_p"),
    ({"prompt": "x", "stream_options": {"x": 1}}, "stream_options"),
]


def test_every_malformed_request_gets_400_naming_the_field(server):
  for body, field in BAD:
    r = server.post("/v1/completions", body)
    assert r.status_code == 400, (body, r.text)
    error = r.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error", (body, error)
    if field:
      assert field in error["message"], error
  for body in ({"messages": []}, {"messages": [{"role": "robot", "content": "x"}]}, {"prompt": "x"},
               {"messages": [{"role": "user", "content": 3}]}):
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] in ("messages", "prompt"), r.text
  r = server.post("/v1/completions", {"model": "gpt-4", "prompt": "x"})
  assert r.status_code == 404 and r.json()["error"]["param"] == "model"
  with pytest.raises(openai.BadRequestError, match="block_length"):
    server.openai().completions.create(model=NAME, prompt="x", max_tokens=8, extra_body={"block_length": 0})


BUSY = {"prompt": "the", "max_tokens": 256}  # holds the tiny model's device for seconds: 256 steps


def _wait_for(server, metric: str, at_least: float, **labels) -> None:
  deadline = time.monotonic() + 60
  while server.metric(metric, **labels) < at_least:
    assert time.monotonic() < deadline, f"{metric} never reached {at_least}"
    time.sleep(0.02)


def test_request_timeout_gives_504_and_drops_what_still_waits(sft_workdir, tmp_path_factory):
  """--request_timeout_s=1: BUSY (seconds on the device) is answered 504 when its time is up; a request
  queued behind it times out while waiting and is dropped before it reaches the device; the server goes
  on answering."""
  for quick in _serving(sft_workdir, tmp_path_factory, "--max_batch=1", "--batch_timeout_ms=0",
                        "--request_timeout_s=1"):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      busy = pool.submit(quick.post, "/v1/completions", BUSY)
      _wait_for(quick, "llada_running_rows", 1)
      queued = quick.post("/v1/completions", {"prompt": "late", "max_tokens": 8})
      assert queued.status_code == 504 and queued.json()["error"]["type"] == "timeout_error", queued.text
      assert quick.metric("llada_dropped_requests_total", reason="timeout") == 1
      late = busy.result(timeout=120)
      assert late.status_code == 504 and "request_timeout_s=1" in late.json()["error"]["message"]
    assert quick.metric("llada_requests_total", endpoint="completions", status="504") == 2
    assert httpx.get(quick.url + "/health", timeout=10).json()["status"] == "ok"


def test_overflow_disconnect_and_sigterm_drain(small):
  """One busy period of the `small` server (max_batch 1, max_queue 2): while BUSY holds the device, a
  client that gives up is dropped from the queue, two requests fill it, the next gets 429; then SIGTERM:
  everything in flight is answered and the process ends by the signal."""
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    busy = pool.submit(small.post, "/v1/completions", BUSY)
    _wait_for(small, "llada_running_rows", 1)  # on the device (compiling, then sampling)
    with pytest.raises(httpx.ReadTimeout):
      small.post("/v1/completions", {"prompt": "gone", "max_tokens": 16}, timeout=0.5)
    _wait_for(small, "llada_dropped_requests_total", 1, reason="disconnected")
    waiting = [pool.submit(small.post, "/v1/completions", {"prompt": f"q{k}", "max_tokens": 16}) for k in range(2)]
    _wait_for(small, "llada_queue_depth", 2)
    refused = small.post("/v1/completions", {"prompt": "more", "max_tokens": 16}, timeout=10)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert small.metric("llada_running_rows") == 1, "BUSY ended too soon for this test: make it longer"
    small.proc.send_signal(signal.SIGTERM)
    assert busy.result(timeout=120).status_code == 200
    assert [f.result(timeout=120).status_code for f in waiting] == [200, 200]
  # Drained, then ended by the signal it was sent (uvicorn re-raises it once the drain is done).
  assert small.proc.wait(timeout=60) == -signal.SIGTERM
  assert "llada-serve: stopped" in small.stop()[1]
  with pytest.raises(httpx.ConnectError):
    httpx.get(small.url + "/health", timeout=2)


# --- The request layer without HTTP -------------------------------------------------------------------------


class _Tok:
  vocab_size, eos_id, pad_id = 100, 1, 0

  def piece_to_id(self, piece):
    return 8 if piece == "<|eot_id|>" else None

  def decode(self, ids):
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_canvas_rounds_max_tokens_up_to_a_bucket_that_takes_the_options():
  class Model:
    tokenizer, chat, block_size, model_config = _Tok(), False, 0, type("C", (), {"max_seq_len": 128})()
    check_options = serving.LoadedModel.check_options

    def encode_prompt(self, text, chat=None):
      return [1] + [5] * len(text)

  cfg = api.ServerConfig(max_batch=4)
  job = api.parse_completion({"prompt": "abc", "max_tokens": 20}, Model(), cfg)
  assert (job.cfg.gen_length, job.cfg.steps, job.cfg.block_length, job.max_tokens) == (32, 32, 32, 20)
  job = api.parse_completion({"prompt": "abc", "max_tokens": 20, "block_length": 12}, Model(), cfg)
  assert job.cfg.gen_length == 24  # no power of two is a multiple of 12: whole blocks
  job = api.parse_completion({"prompt": "abc", "max_tokens": 20, "steps": 20, "block_length": 4}, Model(), cfg)
  assert job.cfg.gen_length == 20  # 32 would be 8 blocks, which 20 steps cannot split evenly
  job = api.parse_completion({"prompt": "x" * 80, "max_tokens": 40}, Model(), cfg)
  assert job.cfg.gen_length == 40  # 64 does not fit beside the 81-token prompt; the exact canvas does
  with pytest.raises(api.BadRequest, match="prompt") as e:
    api.parse_completion({"prompt": "x" * 120, "max_tokens": 40}, Model(), cfg)
  assert e.value.field == "prompt"
  # A block-diffusion model decodes its own blocks, steps per block; the canvas is whole blocks.
  block_model = Model()
  block_model.block_size = 8
  job = api.parse_completion({"prompt": "abc", "max_tokens": 20, "threshold": 0.9}, block_model, cfg)
  assert (job.cfg.gen_length, job.cfg.steps, job.cfg.block_length, job.cfg.threshold) == (32, 8, 8, 0.9)
  with pytest.raises(api.BadRequest, match="block_length") as e:
    api.parse_completion({"prompt": "abc", "max_tokens": 20, "block_length": 4}, block_model, cfg)
  assert e.value.field == "block_length"


def test_choice_result_cuts_at_eos_max_tokens_and_stop_strings():
  job = api.Job("completion", [[1, 2]], 1, 0, None, max_tokens=4, stop=("c",))
  tok = _Tok()
  assert api.choice_result(job, 0, [0, 1, 5, 5], 3, tok).finish_reason == "stop"  # EOS
  c = api.choice_result(job, 0, [0, 3, 4, 5, 6, 1], 6, tok)
  assert (c.text, c.finish_reason, c.tokens) == ("adef", "length", 4)  # cut at max_tokens
  c = api.choice_result(job, 0, [0, 1, 2, 2], 4, tok)
  assert (c.text, c.finish_reason) == ("a", "stop")
  c = api.choice_result(job, 0, [0, 1, 2, 3], 4, tok)
  assert c.text == "a" and c.tokens == 1
  c = api.choice_result(job, 0, [0, 0, 2, 3, 4], 5, tok)  # 'c' (id 2) is a stop string
  assert (c.text, c.finish_reason) == ("aa", "stop")
  assert api.canvas_text(job, [0, 99, 2, 99, 5], 99, tok) == "a░c░"


def test_load_benchmark_prints_its_table(sft_workdir, tmp_path):
  out = tmp_path / "rows.json"
  r = subprocess.run([sys.executable, "benchmarks/serve_load.py", f"--workdir={sft_workdir}", "--concurrency=1,2",
                      "--max_batches=2", "--requests_per_client=1", "--max_tokens=8", f"--json={out}"],
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=command_env(1),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "req/s" in r.stdout and "p99 s" in r.stdout
  rows = json.loads(out.read_text())["rows"]
  assert [(row["clients"], row["requests"]) for row in rows] == [(1, 1), (2, 2)]
  # (this 2-step model answers EOS at once: completion tokens may be 0; the canvas is always decoded)
  assert all(row["canvas_tokens_per_s"] > 0 and row["tokens_per_s"] >= 0 and 1 <= row["rows_per_call"] <= 2
             and row["p99_s"] >= row["p50_s"] for row in rows)
