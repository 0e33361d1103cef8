"""`llada-serve`: an OpenAI-compatible HTTP server for one trained or converted model.

  pip install -e ".[serve]"
  llada-serve --workdir=/tmp/llada_demo --port=8000
  curl localhost:8000/v1/completions -d '{"prompt": "the capital of", "max_tokens": 32, "block_length": 8}'

Concurrent requests with the same sampling options share one sampler call (`llada_jax.server.batcher`);
see `llada_jax.server.app` for the endpoints and `llada_jax.server.api` for the request fields. SIGTERM
(or Ctrl-C) stops accepting connections, finishes the requests in flight and those queued (at most
--drain_timeout_s), prints "llada-serve: stopped", then ends by that signal.
"""

import os
import sys

from absl import app, flags

from llada_jax.cli import common, parsing

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run or a conversion (llada-convert).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.", lower_bound=0, upper_bound=65535)
_NAME = flags.DEFINE_string("model_name", None, "The model id clients send as `model` (default: the "
                            "workdir's folder name).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Rows (prompts x n) per sampler call; 1 turns batching off.")
_TIMEOUT_MS = flags.DEFINE_float("batch_timeout_ms", 10.0, "How long the first request of a batch waits for "
                                 "companions while the device is idle.")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 256, "Requests that may wait for the device; more get 429.")
_REQUEST_TIMEOUT = flags.DEFINE_float("request_timeout_s", 300.0, "A request not answered by then gets 504.")
_PROMPT_BUCKETS = flags.DEFINE_list("prompt_buckets", [], "Prompt widths (tokens) prompts are padded to "
                                    "(default: powers of two from 16).")
_GEN_BUCKETS = flags.DEFINE_list("gen_buckets", [], "Canvas lengths max_tokens is rounded up to "
                                 "(default: powers of two from 16).")
_DRAIN = flags.DEFINE_float("drain_timeout_s", 60.0, "On SIGTERM, how long requests in flight may take.")


def _ints(flag: flags.FlagHolder) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in flag.value)
  except ValueError as e:
    raise ValueError(f"--{flag.name} must be comma-separated integers: {e}") from e


def _say(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


@common.user_errors("llada-serve")
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}: every option is a --flag=value")
  try:
    import uvicorn  # the [serve] extra
    from llada_jax.server import api, app as server_app
  except ImportError as e:
    raise ImportError(f"llada-serve needs the serve extra: pip install 'llada_jax[serve]' ({e})") from e
  from llada_jax import serving
  name = _NAME.value or os.path.basename(os.path.normpath(_WORKDIR.value)) or "llada"
  config = api.ServerConfig(model_name=name, max_batch=_MAX_BATCH.value, batch_timeout_ms=_TIMEOUT_MS.value,
                            max_queue=_MAX_QUEUE.value, request_timeout_s=_REQUEST_TIMEOUT.value,
                            prompt_buckets=_ints(_PROMPT_BUCKETS), gen_buckets=_ints(_GEN_BUCKETS))
  if _DRAIN.value < 0:
    raise ValueError(f"--drain_timeout_s={_DRAIN.value} must be >= 0")
  model = serving.load(_WORKDIR.value, _STEP.value)
  if model.is_causal:
    raise ValueError(f"{_WORKDIR.value} holds a causal model (model.causal=True, the autoregressive baseline): "
                     "llada-serve serves diffusion models; sample it with llada-sample")
  application = server_app.make_app(model, config, log=_say)
  _say(f"llada-serve: serving '{name}' (step {model.step}, {'chat' if model.chat else 'base'} model) on "
       f"http://{_HOST.value}:{_PORT.value}")
  # On SIGTERM / SIGINT uvicorn drains, then re-raises the signal: the process ends by it, as a supervisor
  # expects (status 128 + 15 from a shell).
  uvicorn.run(application, host=_HOST.value, port=_PORT.value, timeout_graceful_shutdown=_DRAIN.value,
              log_level="info" if common.VERBOSE.value else "warning")
  return 0


def run():
  flags.mark_flag_as_required("workdir")
  app.run(main, flags_parser=parsing.flags_parser("llada-serve"))


if __name__ == "__main__":
  run()
