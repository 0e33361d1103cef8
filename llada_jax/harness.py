"""llada_jax as a model of EleutherAI's lm-evaluation-harness (`pip install llada_jax[eval]`).

  lm = LladaLM("/tmp/llada_demo", mc_num=32)
  lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=TaskManager(include_path="tasks/"))

Importing this module registers the class as lm-eval's model `llada_jax`. The harness asks three
questions and each goes to the piece of the package that already answers it: `loglikelihood` to
`evaluate.Scorer` (a Monte Carlo lower bound for the diffusion model, exact for the causal baseline),
`loglikelihood_rolling` to `Scorer.rolling_loglikelihood`, `generate_until` to the sampler through
`serving.LoadedModel.complete`. Nothing here downloads: lm-eval's built-in tasks fetch their data on
first use, local task folders (`include_path`) need no network.

Decisions, all in the release's spirit (REFERENCE §5):
- Contexts start like a training document: after EOS for a base model (documents are EOS-joined, and
  `encode_prompt` starts prompts the same way), after BOS when lm-eval rendered the context with the
  chat template. So an empty context is just that one token, for the diffusion and causal models alike.
- A continuation of one token is scored with one sample: masking its single token is the only draw
  the l-based estimator can make, so the estimate is exact and mc_num more copies would add nothing.
- `is_greedy` costs one reverse process per request and only a few tasks (LAMBADA-style `acc`) read
  it, so it is computed only with `check_greedy=True` (as the release's `is_check_greedy`) and is
  False otherwise.
- Estimates are seeded (`seed`): the same request list scores the same twice. The Scorer draws masks
  per group of pairs, so a pair's estimate (not its expectation) depends on the list it came in.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
from typing import Any, Sequence

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llada_jax import evaluate, files, sampling_options, serving
from llada_jax.data import sft, tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default when a task does not say


@register_model("llada_jax")
class LladaLM(LM):
  """A llada_jax workdir (or an already `serving.load`ed model) behind lm-eval's `LM` interface.

  Likelihood options are `evaluate.LikelihoodConfig`'s: mc_num, batch_size (Monte Carlo samples per
  forward pass), estimator, max_rows, and the shared cfg_scale and seed. Generation takes the sampling
  options of every inference command, with their defaults (`sampling_options.OPTIONS`: gen_length,
  steps, block_length, temperature, cfg_scale, remasking, threshold, suppress_eos_logit,
  suppress_eos_confidence, early_exit, kv_cache, seed); an unknown keyword is a ValueError naming it.
  Their rule for unset lengths (`sampling_options.resolve`) gets each request's budget here: gen_length
  is the task's `max_gen_toks` (DEFAULT_MAX_GEN_TOKS when the task names none), rounded up to a
  multiple of block_length; steps and block_length default to gen_length. Answers are cut to the
  task's `max_gen_toks` tokens and at its first `until` string; a task's temperature / do_sample=false
  overrides the temperature. gen_batch_size prompts are sampled together. A causal model samples left
  to right and ignores steps and block_length.
  lm-eval's `device` and `max_batch_size` are accepted and ignored (JAX places the model itself).
  """

  def __init__(self, workdir: str | None = None, *, model: serving.LoadedModel | None = None,
               step: int | None = None, mc_num: int = 128, batch_size: int | str = 16, estimator: str = "l",
               max_rows: int = 64, check_greedy: bool = False, gen_batch_size: int = 8, device: Any = None,
               max_batch_size: Any = None, **options: Any):
    super().__init__()
    del device, max_batch_size
    # Checked first: a misspelt option fails before minutes of restoring a big model.
    self.options = sampling_options.parse(options, where="LladaLM", others=_KEYWORDS)
    if (workdir is None) == (model is None):
      raise ValueError("give exactly one of workdir=... (a training workdir) or model=... (serving.load's)")
    if workdir is not None and files.path(workdir).exists() and tokenizer_lib.find(
        workdir) is None:  # before minutes of restoring a big model
      raise FileNotFoundError(f"no {tokenizer_lib.TOKENIZER_FILE} or {tokenizer_lib.HF_TOKENIZER_FILE} in "
                              f"{workdir}: scoring text needs the tokenizer the model was trained with "
                              f"(llada-train keeps it in the workdir)")
    self.model = model if model is not None else serving.load(workdir, step)
    self.workdir = workdir
    self.likelihood = evaluate.LikelihoodConfig(
        mc_num=_int("mc_num", mc_num), batch_size=_int("batch_size", batch_size), estimator=estimator,
        cfg_scale=self.options["cfg_scale"], seed=self.options["seed"], max_rows=_int("max_rows", max_rows))
    self.check_greedy = bool(check_greedy)
    self.gen_batch_size = _int("gen_batch_size", gen_batch_size)
    self.scorer = evaluate.Scorer.from_loaded(self.model)
    self.tok = self.model.tokenizer
    self.max_seq_len = self.model.model_config.max_seq_len
    self._ignored: set[str] = set()  # unknown gen_kwargs already warned about

  # --- Tokenization ----------------------------------------------------------------------------------

  def _encode(self, text: str) -> list[int]:
    # Contexts may be chat-templated text (apply_chat_template below): let them spell special pieces.
    return self.tok.encode(text, special=True)

  def _start(self, context: str) -> list[int]:
    """The token a context follows: BOS when it was rendered with the chat template, else EOS."""
    return [self.tok.bos_id if context.startswith(tokenizer_lib.START_HEADER) else self.tok.eos_id]

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces move to the continuation; the continuation is what the joint
    encoding holds past the context's own encoding, so the boundary tokenizes as in running text.
    Where a merge crosses the boundary (the joint encoding does not start with the context's), the
    continuation is encoded alone, so the scored ids always decode to context + continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = self._encode(context) if context else []
    whole = self._encode(context + continuation)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self._encode(continuation)
    prompt = self._start(context) + ctx
    room = self.max_seq_len - len(cont)
    if room < 1:
      raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's max_seq_len="
                       f"{self.max_seq_len} after at least one context token")
    return prompt[-room:], cont  # over-long contexts lose their oldest tokens, as in lm-eval's HFLM

  # --- lm-eval's three requests ----------------------------------------------------------------------

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    pairs = [self._encode_pair(*req.args) for req in requests]
    scores = np.zeros(len(pairs))
    exact = self.likelihood.estimator == "l"  # the t-based estimator stays random for one token
    one = [i for i, (_, c) in enumerate(pairs) if len(c) == 1 and exact]
    many = [i for i, (_, c) in enumerate(pairs) if len(c) > (1 if exact else 0)]
    one_sample = dataclasses.replace(self.likelihood, mc_num=1, batch_size=1)
    for idx, config in ((one, one_sample), (many, self.likelihood)):
      if idx:
        log.info("scoring %d pairs (mc_num=%d)", len(idx), config.mc_num)
        scores[idx] = self.scorer.loglikelihood([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], config)
    greedy = self._greedy(pairs) if self.check_greedy else [False] * len(pairs)
    # An empty continuation has probability one and is trivially what greedy decoding adds.
    return [(0.0, True) if not c else (float(s), bool(g)) for (_, c), s, g in zip(pairs, scores, greedy)]

  def _greedy(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[bool]:
    """Whether one-token-per-step, most-confident-first decoding (the release's
    `suffix_greedy_prediction`; left to right for the causal model) writes exactly the continuation."""
    out = [False] * len(pairs)
    by_length = collections.defaultdict(list)
    for i, (_, c) in enumerate(pairs):
      if c:
        by_length[len(c)].append(i)
    for n, idx in by_length.items():
      opts = dict(gen_length=n, temperature=0.0)
      if self.model.block_size:  # its own blocks, one token per step
        opts.update(remasking="low_confidence")
      elif not self.model.is_causal:
        opts.update(steps=n, block_length=n, remasking="low_confidence", cfg_scale=self.likelihood.cfg_scale)
      for batch in _batches(sorted(idx, key=lambda i: len(pairs[i][0])), self.gen_batch_size):
        prompts = [pairs[i][0] for i in batch]
        tokens = np.asarray(self.model.generate_ids(prompts, **opts).tokens_BL)
        width = max(len(p) for p in prompts)
        for row, i in enumerate(batch):
          out[i] = tokens[row, width:].tolist() == list(pairs[i][1])
    return out

  def loglikelihood_rolling(self, requests) -> list[float]:
    texts = [self._encode(req.args[0]) for req in requests]
    idx = [i for i, t in enumerate(texts) if t]
    out = np.zeros(len(texts))  # an empty text has log-probability 0
    if idx:
      out[idx] = self.scorer.rolling_loglikelihood([texts[i] for i in idx], self.likelihood,
                                                   bos_id=self.tok.eos_id)
    return [float(x) for x in out]

  def generate_until(self, requests) -> list[str]:
    out: list[str] = [""] * len(requests)
    groups = collections.defaultdict(list)  # one sampler setting per group
    for i, req in enumerate(requests):
      context, kwargs = req.args
      until, max_toks, options = self._generation_options(dict(kwargs or {}))
      room = self.max_seq_len - options["gen_length"]
      if room < 1:
        raise ValueError(f"gen_length={options['gen_length']} leaves no room for a prompt in the model's "
                         f"max_seq_len={self.max_seq_len}")
      ids = (self._start(context) + (self._encode(context) if context else []))[-room:]
      groups[tuple(sorted(options.items()))].append((i, ids, until, max_toks))
    seed = self.options["seed"]
    for key, items in sorted(groups.items(), key=lambda kv: str(kv[0])):
      items.sort(key=lambda item: len(item[1]))
      for batch in _batches(items, self.gen_batch_size):
        done = self.model.complete([], prompt_ids=[ids for _, ids, _, _ in batch], seed=seed, **dict(key))
        seed += 1  # fresh noise per batch when sampling with temperature > 0
        for (i, _, until, max_toks), c in zip(batch, done):
          out[i] = _cut(serving.decode_generated(self.tok, c.token_ids[:max_toks]), until)
    return out

  def _generation_options(self, kwargs: dict[str, Any]) -> tuple[list[str], int, dict[str, Any]]:
    """(stop strings, token budget, sampler options) for one request's lm-eval `gen_kwargs`."""
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_toks = int(kwargs.pop("max_gen_toks", None) or self.options["gen_length"] or DEFAULT_MAX_GEN_TOKS)
    options = sampling_options.resolve(self.options, budget=max_toks, block_size=self.model.block_size)
    del options["seed"]  # generate_until draws a fresh seed per batch
    do_sample = kwargs.pop("do_sample", None)
    temperature = kwargs.pop("temperature", None)
    if do_sample is False:
      options["temperature"] = 0.0
    elif temperature is not None:
      options["temperature"] = float(temperature)
    if set(kwargs) - self._ignored:
      self._ignored |= set(kwargs)
      log.warning("ignoring generation options llada_jax does not have: %s", sorted(kwargs))
    return until, max_toks, options

  # --- Chat template ---------------------------------------------------------------------------------

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The SFT chat template as text (BOS left out; `_start` puts it back). Without a generation
    prompt the last (assistant) message stays open: lm-eval prefills the answer's start that way."""
    if not self.model.chat:
      raise ValueError("this model was not fine-tuned with SFT and has no chat template; evaluate it "
                       "without --apply_chat_template")
    history = list(chat_history)
    if not add_generation_prompt and history and history[-1]["role"] == "assistant":
      ids = sft.render_prompt(history[:-1], self.tok, answer_prefix=history[-1]["content"])
    else:
      ids = sft.render_prompt(history, self.tok)
    return self.tok.decode(ids[1:])

  @property
  def tokenizer_name(self) -> str:
    return "llada_jax-" + self.tok.fingerprint()

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    return "llada_jax Llama-3-style (llada_jax.data.sft)" if chat_template and self.model.chat else None

  def get_model_info(self) -> dict[str, Any]:
    """What lm-eval records under results['config']."""
    return {"workdir": self.workdir, "step": self.model.step, "causal": self.model.is_causal,
            "likelihood": dataclasses.asdict(self.likelihood), "check_greedy": self.check_greedy,
            "generation": dict(self.options)}


# LladaLM's own keywords, named beside the sampling options when a keyword is unknown.
_KEYWORDS = tuple(name for name, p in inspect.signature(LladaLM.__init__).parameters.items()
                  if name != "self" and p.kind is not p.VAR_KEYWORD)


def _int(name: str, value: Any) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"option '{name}' must be an integer; got {value!r}") from None


def _batches(items: Sequence[Any], size: int):
  for start in range(0, len(items), size):
    yield items[start:start + size]


def _cut(text: str, until: Sequence[str]) -> str:
  """`text` up to the first occurrence of any stop string."""
  ends = [text.find(s) for s in until if s]
  ends = [e for e in ends if e >= 0]
  return text[:min(ends)] if ends else text
