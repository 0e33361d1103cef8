"""The OpenAI-compatible request and response bodies of `llada-serve`: pure functions, no HTTP.

`parse_completion` / `parse_chat` turn a request body into a `Job` (prompt ids, the sampler's options,
seed, choices) or raise `BadRequest` naming the field; `choice_result` cuts a generated row into the
answer a client sees; `completion_body` / `chat_body` / `*_chunk` write the JSON.

Field mapping. OpenAI names where they exist: `max_tokens` (chat also `max_completion_tokens`) is the
token budget, `temperature`, `seed`, `stop` (up to 4 strings), `n` (choices per prompt), `stream`
(+ `stream_options.include_usage`). Every other sampling option of `llada_jax.sampling_options` (`steps`,
`block_length`, `remasking`, `threshold`, `kv_cache`, `cfg_scale`, `suppress_eos_logit`,
`suppress_eos_confidence`, `early_exit`) is an extra body field of the same name, with the same default
as `llada-sample`'s flag (so `temperature` defaults to 0, greedy, and `seed` to 0). OpenAI fields
with no meaning here are accepted only at their neutral value (`top_p` 1, penalties 0, no logprobs,
no echo, ...); anything else is a 400.

The canvas. A diffusion model generates into a fixed number of masked positions (`gen_length`). To
keep the number of compiled programs small, `max_tokens` is rounded up to a canvas bucket (the first of
`ServerConfig.gen_buckets` that is >= it and a multiple of `block_length`; if `steps` is given and that
canvas cannot take it, or no bucket fits, `max_tokens` rounded up to whole blocks) and the answer is
cut at `max_tokens` tokens, as `llada-eval` does with a task's budget. Unset `steps` / `block_length`
derive from the canvas as in `sampling_options.resolve`. A request's answer is token for token
`llada-sample --gen_length=<canvas> --seed=<seed>` with the same options (choice c of a request draws
from `fold_in(key(seed), c)`, what row c of an `llada-sample` call with the prompt given c + 1 times draws),
cut at `max_tokens`; the response says which canvas, steps and block length ran (`diffusion`).
"""

from __future__ import annotations

import dataclasses
import difflib
import time
import uuid
from typing import Any, Mapping, Sequence

from llada_jax import errors, sampling, sampling_options, serving
from llada_jax.data import sft, tokenizer as tokenizer_lib
from llada_jax.visualize import MASK_GLYPH

MAX_STOP = 4  # stop strings per request, as OpenAI


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
  """lo, 2 lo, 4 lo, ... up to hi. Example: powers_of_two(16, 100) -> (16, 32, 64)."""
  out = []
  while lo <= hi:
    out.append(lo)
    lo *= 2
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """How `llada-serve` batches and bounds its work (`llada-serve --help` documents each flag)."""

  model_name: str = "llada"           # the model id clients name (`model`) and GET /v1/models lists
  max_batch: int = 16                 # rows (prompts x n) per sampler call
  batch_timeout_ms: float = 10.0      # how long the first request of a batch waits for companions
  max_queue: int = 256                # requests waiting for the device; more get 429
  request_timeout_s: float = 300.0    # a request not answered by then gets 504 (dropped if still queued)
  prompt_buckets: tuple[int, ...] = ()  # prompt widths (tokens); () = powers of two from 16
  gen_buckets: tuple[int, ...] = ()     # canvas lengths (tokens); () = powers of two from 16

  def __post_init__(self):
    checks = {"max_batch": self.max_batch >= 1, "batch_timeout_ms": self.batch_timeout_ms >= 0,
              "max_queue": self.max_queue >= 1, "request_timeout_s": self.request_timeout_s > 0}
    allowed = {"max_batch": ">= 1", "batch_timeout_ms": ">= 0", "max_queue": ">= 1", "request_timeout_s": "> 0"}
    for name, ok in checks.items():
      if not ok:
        raise ValueError(f"server option {name}={getattr(self, name)!r} must be {allowed[name]}")
    for name in ("prompt_buckets", "gen_buckets"):
      value = getattr(self, name)
      if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in value):
        raise ValueError(f"server option {name}={value!r} must hold positive integers")
    if not self.model_name:
      raise ValueError("server option model_name must not be empty")

  def buckets(self, max_seq_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prompt widths, canvas lengths), sorted; the defaults are powers of two from 16 to max_seq_len."""
    default = powers_of_two(16, max_seq_len)
    return (tuple(sorted(self.prompt_buckets or default)), tuple(sorted(self.gen_buckets or default)))


class BadRequest(Exception):
  """A request the server refuses: HTTP `status`, the body `field` at fault (None: the whole body) and
  a message; `headers` for the response (429's Retry-After)."""

  def __init__(self, field: str | None, message: str, *, status: int = 400, kind: str = "invalid_request_error",
               headers: Mapping[str, str] | None = None):
    super().__init__(message)
    self.field, self.status, self.kind, self.headers = field, status, kind, dict(headers or {})

  def body(self) -> dict[str, Any]:
    return {"error": {"message": str(self), "type": self.kind, "param": self.field, "code": None}}


@dataclasses.dataclass
class Job:
  """One request, ready for the batcher: rows = prompts x n, row r is prompt r // n, choice r."""

  kind: str                       # "completion" | "chat"
  prompts: list[list[int]]
  n: int
  seed: int
  cfg: sampling.SamplingConfig    # the program's options (gen_length = the canvas)
  max_tokens: int
  stop: tuple[str, ...] = ()
  stream: bool = False
  include_usage: bool = False
  id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))

  @property
  def rows(self) -> int:
    return len(self.prompts) * self.n

  def row_prompt(self, row: int) -> list[int]:
    return self.prompts[row // self.n]


# --- Parsing -----------------------------------------------------------------------------------------------

_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _typed(field: str, value: Any, kind: type, *, optional: bool = False) -> Any:
  """`value` if it is a JSON value of `kind` (an integer is a number too; a boolean is neither)."""
  if value is None and optional:
    return None
  ok = (isinstance(value, bool) if kind is bool else
        isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
        isinstance(value, kind) and not isinstance(value, bool))
  if not ok:
    raise BadRequest(field, f"'{field}' must be {_TYPES[kind]}{' or null' if optional else ''}; got {value!r}")
  return float(value) if kind is float else value


def _neutral(value: Any, allowed: Sequence[Any]) -> bool:
  """`value` is one of `allowed` (null is null; true is not 1)."""
  return any(value is None if v is None else value == v and isinstance(value, bool) == isinstance(v, bool)
             for v in allowed)


# OpenAI fields that change nothing at these values; any other value is refused.
_NEUTRAL = {"top_p": (1, None), "frequency_penalty": (0, None), "presence_penalty": (0, None),
            "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (False, None), "suffix": (None,),
            "best_of": (None, 1), "logit_bias": (None,), "response_format": (None,), "tools": (None,),
            "tool_choice": (None, "none"), "parallel_tool_calls": (None,)}
_FREE = ("user", "metadata", "service_tier", "store")  # accepted whatever they hold (bookkeeping)
# The sampler's options a body may set (gen_length is max_tokens here).
_SAMPLER = tuple(n for n in sampling_options.NAMES if n != "gen_length")
_COMMON = ("model", "max_tokens", "n", "stop", "stream", "stream_options") + _SAMPLER


def _check_fields(body: Mapping[str, Any], own: Sequence[str]) -> None:
  known = tuple(own) + _COMMON + tuple(_NEUTRAL) + _FREE
  for name, value in body.items():
    if name == "gen_length":
      raise BadRequest(name, "unknown field 'gen_length': the canvas length is 'max_tokens' here")
    if name not in known:
      close = difflib.get_close_matches(name, known, n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ""
      raise BadRequest(name, f"unknown field '{name}'{hint}; the diffusion sampler's fields are "
                             f"{', '.join(_SAMPLER)}")
    if name in _NEUTRAL and not _neutral(value, _NEUTRAL[name]):
      allowed = " or ".join("null" if v is None else repr(v).lower() for v in _NEUTRAL[name])
      raise BadRequest(name, f"'{name}' is not supported by the diffusion sampler; it may only be {allowed}")


def _stop(value: Any) -> tuple[str, ...]:
  if value is None:
    return ()
  stops = [value] if isinstance(value, str) else value
  if (not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP
      or not all(isinstance(s, str) and s for s in stops)):
    raise BadRequest("stop", f"'stop' must be a non-empty string or a list of 1 to {MAX_STOP} of them; got {value!r}")
  return tuple(stops)


def _canvas(max_tokens: int, given: dict[str, Any], buckets: Sequence[int], fits,
            prompt_field: str, block_size: int = 0) -> sampling.SamplingConfig:
  """The sampler's options for a `max_tokens` budget (module docstring): each candidate canvas through
  `sampling_options.resolve` (which derives unset steps / block_length, and rounds a budget up to whole
  blocks), the first that `fits` (raises errors.OptionError otherwise); the exact canvas's error, in the
  request's field names, if none does."""
  block = given.get("block_length")
  candidates = [sampling_options.resolve({**given, "gen_length": b}, block_size=block_size) for b in buckets
                if b >= max_tokens and (not block or b % block == 0)]  # block 0 is refused by `fits`
  candidates.append(sampling_options.resolve(given, budget=max_tokens, block_size=block_size))
  for k, options in enumerate(candidates):
    cfg = sampling.SamplingConfig(**{name: v for name, v in options.items() if name != "seed"})
    try:
      fits(cfg)
      return cfg
    except errors.OptionError as e:
      if k == len(candidates) - 1:
        field = {"gen_length": "max_tokens", "prompt": prompt_field}.get(e.option, e.option)
        raise BadRequest(field, f"'{field}': " + str(e).replace("gen_length", "max_tokens")) from None
  raise AssertionError("unreachable")


def _job(kind: str, body: Mapping[str, Any], prompts: list[list[int]], prompt_field: str,
         model: serving.LoadedModel, server: ServerConfig, max_tokens_field: str = "max_tokens") -> Job:
  option_values = {}
  for name in _SAMPLER:
    if name in body:
      o = sampling_options.BY_NAME[name]
      option_values[name] = _typed(name, body[name], o.type, optional=o.optional)
  try:
    options = sampling_options.parse(option_values)  # choices, and the typed values
  except errors.OptionError as e:
    raise BadRequest(e.option, str(e)) from None
  if not -2 ** 63 <= options["seed"] < 2 ** 63:
    raise BadRequest("seed", f"'seed' must be a 64-bit integer, in [-2**63, 2**63); got {options['seed']}")
  max_tokens = _typed(max_tokens_field, body.get(max_tokens_field), int, optional=True)
  max_tokens = sampling_options.DEFAULT_GEN_LENGTH if max_tokens is None else max_tokens
  if max_tokens < 1:
    raise BadRequest(max_tokens_field, f"'{max_tokens_field}' must be >= 1; got {max_tokens}")
  n = _typed("n", body.get("n", 1), int)
  if not 1 <= n or n * len(prompts) > server.max_batch:
    raise BadRequest("n", f"'n' x the number of prompts must be in [1, {server.max_batch}] (the server's "
                          f"max_batch); got n={n} for {len(prompts)} prompt(s)")
  stream = _typed("stream", body.get("stream", False), bool, optional=True) or False
  stream_options = body.get("stream_options")
  if stream_options is not None and (not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}
                                     or not isinstance(stream_options.get("include_usage", False), bool)):
    raise BadRequest("stream_options", "'stream_options' may only hold 'include_usage' (true or false)")
  L = model.model_config.max_seq_len
  shortest, longest = min(map(len, prompts)), max(map(len, prompts))
  fits = lambda cfg: model.check_options(cfg, shortest, longest)
  cfg = _canvas(max_tokens, option_values, server.buckets(L)[1], fits, prompt_field, model.block_size)
  return Job(kind, prompts, n, options["seed"], cfg, max_tokens, _stop(body.get("stop")), stream,
             bool((stream_options or {}).get("include_usage", False)))


def _check_model(body: Mapping[str, Any], server: ServerConfig) -> None:
  name = body.get("model")
  if name is not None and name != server.model_name:
    raise BadRequest("model", f"the model '{name}' does not exist; this server serves '{server.model_name}'",
                     status=404, kind="not_found_error")


def _token_list(value: Any, vocab: int) -> list[int] | None:
  if isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
    if not all(0 <= i < vocab for i in value):
      raise BadRequest("prompt", f"'prompt' holds token ids outside the vocabulary [0, {vocab})")
    return list(value)
  return None


def parse_completion(body: Any, model: serving.LoadedModel, server: ServerConfig) -> Job:
  """POST /v1/completions. `prompt`: a string, a list of strings, a list of token ids or a list of such
  lists. A text prompt starts a document (`llada-sample --chat=false`): no chat template here."""
  if not isinstance(body, dict):
    raise BadRequest(None, f"the body must be a JSON object; got {type(body).__name__}")
  _check_fields(body, ("prompt",))
  _check_model(body, server)
  if "prompt" not in body:
    raise BadRequest("prompt", "'prompt' is required")
  raw, tok = body["prompt"], model.tokenizer
  ids = _token_list(raw, tok.vocab_size)
  if ids is not None:
    prompts = [ids]
  elif isinstance(raw, str):
    prompts = [model.encode_prompt(raw, chat=False)]
  elif isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
    prompts = [model.encode_prompt(p, chat=False) for p in raw]
  elif isinstance(raw, list) and raw and all(_token_list(p, tok.vocab_size) is not None for p in raw):
    prompts = [list(p) for p in raw]
  else:
    raise BadRequest("prompt", "'prompt' must be a string, a non-empty list of strings, a non-empty list of "
                               f"token ids or a list of such lists; got {str(raw)[:80]!r}")
  return _job("completion", body, prompts, "prompt", model, server)


def _content(message: Any, k: int) -> dict[str, str]:
  where = f"messages[{k}]"
  if not isinstance(message, dict) or "role" not in message or "content" not in message:
    raise BadRequest("messages", f"{where} must be an object with 'role' and 'content'")
  role, content = message["role"], message["content"]
  if role not in sft.ROLES:
    raise BadRequest("messages", f"{where}.role must be one of {', '.join(sft.ROLES)}; got {role!r}")
  if isinstance(content, list):  # OpenAI's content parts: text only
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
      raise BadRequest("messages", f"{where}.content parts must all be {{'type': 'text', 'text': ...}}")
    content = "".join(p["text"] for p in content)
  if not isinstance(content, str):
    raise BadRequest("messages", f"{where}.content must be a string or a list of text parts")
  return {"role": role, "content": content}


def parse_chat(body: Any, model: serving.LoadedModel, server: ServerConfig) -> Job:
  """POST /v1/chat/completions: the messages rendered with the released chat template and a generation
  prompt (`llada-sample --chat=true`, or `llada-chat`'s turn). Refused for a base model (no SFT)."""
  if not isinstance(body, dict):
    raise BadRequest(None, f"the body must be a JSON object; got {type(body).__name__}")
  _check_fields(body, ("messages", "max_completion_tokens"))
  _check_model(body, server)
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise BadRequest("messages", "'messages' must be a non-empty list of {'role', 'content'} objects")
  history = [_content(m, k) for k, m in enumerate(messages)]
  if not model.chat:
    raise BadRequest("messages", f"'{server.model_name}' is a base model (not fine-tuned for chat: model.chat="
                                 "false); use /v1/completions")
  if "max_tokens" in body and "max_completion_tokens" in body:
    raise BadRequest("max_completion_tokens", "give 'max_tokens' or 'max_completion_tokens', not both")
  field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
  return _job("chat", body, [sft.render_prompt(history, model.tokenizer)], "messages", model, server, field)


# --- Answers -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Choice:
  index: int
  text: str
  finish_reason: str      # "stop" (EOS, end of turn or a stop string) | "length" (max_tokens reached)
  tokens: int             # completion tokens
  steps: int              # reverse-process steps the row took


def choice_result(job: Job, row: int, answer_ids: Sequence[int], steps: int, tok: Any) -> Choice:
  """What a client sees of row `row`: the canvas cut at the first EOS / end of turn, at `max_tokens`,
  then at the first stop string."""
  kept = sampling.strip_at_stop(answer_ids, tokenizer_lib.stop_ids(tok))
  finish = "stop" if len(kept) < len(answer_ids) and len(kept) <= job.max_tokens else "length"
  kept = kept[:job.max_tokens]
  text = serving.decode_generated(tok, kept)
  cut = min((text.find(s) for s in job.stop if s in text), default=-1)
  if cut >= 0:
    text, finish = text[:cut], "stop"
  return Choice(row, text, finish, len(kept), steps)


def canvas_text(job: Job, answer_ids: Sequence[int], mask_id: int, tok: Any) -> str:
  """The answer as it stands mid-decode: committed tokens as text, masked positions as `░`, up to
  `max_tokens`."""
  out, run = [], []
  for i in list(answer_ids)[:job.max_tokens]:
    if int(i) == mask_id:
      out.append(serving.decode_generated(tok, run) + MASK_GLYPH)
      run = []
    else:
      run.append(int(i))
  return "".join(out) + serving.decode_generated(tok, run)


def _usage(job: Job, choices: Sequence[Choice]) -> dict[str, int]:
  prompt = sum(len(p) for p in job.prompts)
  completion = sum(c.tokens for c in choices)
  return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _diffusion(job: Job) -> dict[str, Any]:
  c = job.cfg
  return {"gen_length": c.gen_length, "steps": c.steps, "block_length": c.block_length}


def response_body(job: Job, choices: Sequence[Choice], model_name: str) -> dict[str, Any]:
  """The whole answer (no streaming): a text_completion or a chat.completion."""
  if job.kind == "chat":
    items = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
              "finish_reason": c.finish_reason, "logprobs": None, "steps": c.steps} for c in choices]
    obj, prefix = "chat.completion", "chatcmpl-"
  else:
    items = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None,
              "steps": c.steps} for c in choices]
    obj, prefix = "text_completion", "cmpl-"
  return {"id": prefix + job.id, "object": obj, "created": job.created, "model": model_name, "choices": items,
          "usage": _usage(job, choices), "diffusion": _diffusion(job)}


def _chunk(job: Job, model_name: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
  chat = job.kind == "chat"
  return {"id": ("chatcmpl-" if chat else "cmpl-") + job.id,
          "object": "chat.completion.chunk" if chat else "text_completion", "created": job.created,
          "model": model_name, "choices": choices, **extra}


def step_chunk(job: Job, model_name: str, index: int, step: int, committed: Sequence[int],
               canvas: str) -> dict[str, Any]:
  """An intermediate event: at reverse-process `step`, choice `index` committed the answer positions
  `committed`, and its canvas now reads `canvas` (masks as `░`). It carries no text (`text: ""`, an
  empty delta), so a client that concatenates the stream's texts gets the final answer only."""
  choice = {"index": index, "finish_reason": None, "logprobs": None,
            "diffusion": {"step": step, "committed": list(committed), "canvas": canvas}}
  choice.update({"delta": {}} if job.kind == "chat" else {"text": ""})
  return _chunk(job, model_name, [choice])


def final_chunk(job: Job, model_name: str, c: Choice) -> dict[str, Any]:
  """The last event of a choice: its whole answer and finish reason."""
  choice = {"index": c.index, "finish_reason": c.finish_reason, "logprobs": None, "steps": c.steps}
  choice.update({"delta": {"role": "assistant", "content": c.text}} if job.kind == "chat" else {"text": c.text})
  return _chunk(job, model_name, [choice], diffusion=_diffusion(job))


def usage_chunk(job: Job, model_name: str, choices: Sequence[Choice]) -> dict[str, Any]:
  return _chunk(job, model_name, [], usage=_usage(job, choices))
