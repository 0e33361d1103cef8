"""The reversal experiment: a diffusion model and an autoregressive one, trained on the same couplets
written forwards only, asked for the second line given the first and for the first given the second.

REFERENCE §7: on reversal poem completion LLaDA's forward/reversal gap is small while left-to-right
models drop sharply (the "reversal curse"). Here in miniature, from nothing: procedural couplets (two
lines of K words from a fixed list; every line unique, line 2 a fixed random partner of line 1), one
document "line1\\nline2" each (EOS-terminated by the pipeline). Both models have the same shape, data,
tokenizer, steps and seed; only `model.causal` and the objective differ.

Evaluation (temperature 0; every query comes after a few other couplets, see `query_context`):
  forward      prompt "line1\\n", generate (diffusion: gen_length = steps = block_length, the paper's
               setting; autoregressive: left to right until EOS).
  reversal     diffusion: infill the masks of line 1 (as many as its tokens) before "\\nline2" + EOS,
               what a bidirectional model can do; autoregressive: prompt "line2\\n" and generate, the only
               thing a left-to-right model trained on forward text can do.
  reversal (prompt only)  the diffusion model given the autoregressive model's task, for transparency.
Scores, in percent: exact (the answer's first line equals the target line) and substring (the target
line appears in the answer as whole words; the paper's metric).

EOS: the paper suppresses the EOS logit for its Instruct model, whose SFT answers are padded with EOS.
These base models end every document with EOS right after line 2, so EOS is where an answer ends;
banning it makes the sampler fill the spare positions with more words, which run on the answer line
and, committed early, disturb it (on one couplet model: forward substring 34% with, 53% without).
So the default leaves EOS alone; `suppress_eos_logit=True` reproduces the paper's setting.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import jax
import numpy as np

from llada_jax import config as config_lib, files, sampling, serving, train
from llada_jax.configs import default
from llada_jax.data import tokenizer as tokenizer_lib

KINDS = ("diffusion", "autoregressive")
PRESETS = ("tiny", "demo")
# 128 short, common words: lines of K words drawn from them (with replacement) are nearly all distinct.
WORDS = tuple("""
apple arm baby ball bank bed bell bird blue boat bone book boot box boy bread bridge cake car cat chair
cloud coat cold corn cow cup dark dog door dream drum duck dust egg eye farm fire fish flag floor fox
frog game gate girl glass gold grass green hat hill horse house ice iron jam key king kite lake lamp
leaf lion milk moon mouse nest net night nose oak owl paint park pear pen pig pink pot queen rain red
ring river road rock roof rope rose salt sand sea seed sheep ship shoe silk sky snow song star stone
sun swan table tea tent tiger tooth town tree wall water wheel whale wind wing wolf wood wool yard
""".split())


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that defines one run of the experiment (written to the results file)."""

  num_couplets: int = 64
  words_per_line: int = 4
  preset: str = "demo"           # model shape and tokenizer size
  train_steps: int = 2000        # per model
  seed: int = 0                  # couplets and both training runs
  train_batch: int = 16          # sequences per step (both models)
  seq_len: int = 64              # tokens per packed training sequence (a few couplets)
  peak_lr: float = 1e-3          # both models; the diffusion model learns the couplets faster than at 2e-3
  context_pairs: int = 2         # other couplets placed before each query (see `query_context`)
  gen_length: int = 0            # tokens generated for a line; 0: longest line + 2
  suppress_eos_logit: bool = False  # diffusion sampling; see the module docstring
  batch_size: int = 256          # evaluation rows per sampler call


# --- Couplets ---------------------------------------------------------------------------------------------


def make_couplets(num: int, words_per_line: int, seed: int) -> list[tuple[str, str]]:
  """`num` (first, second) lines of `words_per_line` words each; all 2 * num lines differ.

  Deterministic in the arguments. Lines are drawn one after another, so the second line of couplet i
  is line num + i: a fixed random partner with nothing in common with its first line.
  """
  if num < 1 or words_per_line < 1:
    raise ValueError(f"num_couplets and words_per_line must be >= 1; got {num} and {words_per_line}")
  if 2 * num > len(WORDS) ** words_per_line // 4:
    raise ValueError(f"{num} couplets need more distinct lines than {words_per_line}-word lines give; "
                     "raise words_per_line")
  rng = np.random.default_rng(seed)
  lines: dict[str, None] = {}
  while len(lines) < 2 * num:
    lines.setdefault(" ".join(WORDS[i] for i in rng.integers(len(WORDS), size=words_per_line)))
  ordered = list(lines)
  return list(zip(ordered[:num], ordered[num:]))


def load_pairs(path: str) -> list[tuple[str, str]]:
  """A JSON list of {"first": ..., "second": ...} (one line each) from `path`."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise FileNotFoundError(f"pairs file {path}: {e.strerror}") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"pairs file {path} is not JSON: {e}") from e
  if not isinstance(data, list) or not data:
    raise ValueError(f"pairs file {path} must hold a non-empty JSON list of "
                     '{"first": ..., "second": ...} objects')
  pairs = []
  for i, item in enumerate(data):
    for key in ("first", "second"):
      value = item.get(key) if isinstance(item, dict) else None
      if not isinstance(value, str) or not value.strip() or "\n" in value:
        raise ValueError(f"pairs file {path}: entry {i} needs a one-line, non-empty string '{key}'")
    pairs.append((_norm(item["first"]), _norm(item["second"])))
  return pairs


def corpus_jsonl(pairs: Sequence[tuple[str, str]]) -> str:
  """One JSONL document {"text": "first\\nsecond"} per pair: the forward direction only."""
  return "".join(json.dumps({"text": f"{a}\n{b}"}) + "\n" for a, b in pairs)


# --- Training ---------------------------------------------------------------------------------------------


def experiment_config(kind: str, s: Settings, corpus_path: str,
                      tokenizer_path: str = "") -> config_lib.Config:
  """The `s.preset` shape trained on the couplet corpus with the experiment's recipe (short packed
  sequences, small batches, many steps: memorising is what is asked); `kind` picks the objective."""
  if kind not in KINDS or s.preset not in PRESETS:
    raise ValueError(f"kind must be one of {KINDS} and preset one of {PRESETS}; got {kind!r}, {s.preset!r}")
  c = default.get_config(s.preset)
  c.data.update(source="jsonl", paths=(os.path.abspath(corpus_path),), text_field="text",
                tokenizer_path=tokenizer_path, shuffle_seed=s.seed)
  steps = s.train_steps
  c.train.update(num_steps=steps, seed=s.seed, batch_size=s.train_batch, seq_len=s.seq_len, num_samples=0,
                 checkpoint_every=steps, eval_every=0, log_every=max(1, steps // 10))
  c.optim.update(peak_lr=s.peak_lr, warmup_steps=max(1, min(c.optim.warmup_steps, steps // 10)),
                 decay_steps=steps // 5)
  if kind == "autoregressive":
    c.model.causal, c.diffusion.objective = True, "ar"
  return config_lib.from_config_dict(c)


def train_models(pairs: Sequence[tuple[str, str]], out_dir: str, s: Settings) -> dict[str, str]:
  """Trains both kinds on `pairs` (forwards) under `out_dir`; returns {kind: workdir}.

  The autoregressive run reuses the diffusion run's tokenizer, so both see the very same token ids.
  Rerunning with the same `out_dir` resumes (or skips) finished runs.
  """
  corpus = files.path(out_dir, "couplets.jsonl")
  text = corpus_jsonl(pairs)
  if corpus.exists() and corpus.read_text() != text:
    raise ValueError(f"{out_dir} holds a run on other couplets; use a new --output_dir")
  files.write_atomic(corpus, text)
  corpus = os.fspath(corpus)
  workdirs = {}
  for kind in KINDS:
    workdir = os.path.join(out_dir, kind)
    tok = os.path.join(workdirs["diffusion"], tokenizer_lib.TOKENIZER_FILE) if workdirs else ""
    print(f"--- training the {kind} model ({s.preset}, {s.train_steps} steps) in {workdir}", flush=True)
    summary = train.train_and_evaluate(experiment_config(kind, s, corpus, tok), workdir)
    print(f"    {kind}: loss {summary['metrics'].get('loss', float('nan')):.4f}, "
          f"{summary['wall_time_s']:.0f}s", flush=True)
    workdirs[kind] = workdir
  return workdirs


# --- Evaluation -------------------------------------------------------------------------------------------


def _norm(text: str) -> str:
  return " ".join(text.split())


def score(answers: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
  """Percent exact (first line of the answer == target) and substring (target in answer, whole words)."""
  exact = sum(_norm(a.split("\n")[0]) == _norm(t) for a, t in zip(answers, targets))
  sub = sum(f" {_norm(t)} " in f" {_norm(a)} " for a, t in zip(answers, targets))
  n = max(len(targets), 1)
  return {"exact": 100.0 * exact / n, "substring": 100.0 * sub / n}


def _chunks(items: Sequence[Any], size: int):
  for i in range(0, len(items), size):
    yield items[i:i + size]


def query_context(tok, pairs: Sequence[tuple[str, str]], i: int, n: int) -> list[int]:
  """EOS, then `n` couplets other than pair i (the next ones, cyclically), forwards, EOS-terminated.

  Queries are asked the way documents sit in the packed training stream. A model trained on packed
  sequences has rarely seen a lone ten-token document at the start of its input. A half-trained
  diffusion model depends on the text around it (one-pass accuracy on masked line-1 tokens: ~4% alone,
  ~70% after two couplets); once trained, much less (reversal 96.9% alone, 98.4% with context, in
  BENCHMARKS.md). A causal model only ever looks left, where the context is other documents.
  """
  ids = [tok.eos_id]
  for k in range(1, min(n, len(pairs) - 1) + 1):
    a, b = pairs[(i + k) % len(pairs)]
    ids += tok.encode(f"{a}\n{b}") + [tok.eos_id]
  return ids


def _complete(m: serving.LoadedModel, prompts: Sequence[list[int]], s: Settings,
              gen_length: int) -> list[str]:
  """Answers to prompts: the diffusion sampler as in the paper, or left to right."""
  if m.is_causal:
    options = dict(gen_length=gen_length)
  else:
    options = dict(gen_length=gen_length, steps=gen_length, block_length=gen_length,
                   suppress_eos_logit=s.suppress_eos_logit)
  out = []
  for chunk in _chunks(list(prompts), s.batch_size):
    out += [c.text for c in m.complete([], prompt_ids=chunk, **options)]
  return out


def _infill_first_lines(m: serving.LoadedModel, rows: Sequence[list[int]], holes: Sequence[int],
                        s: Settings) -> list[str]:
  """Diffusion reversal: each row ends "masks (one per line-1 token), \n, line 2, EOS"; returns the
  filled line 1 of each."""
  tok = m.tokenizer
  answers = []
  for chunk in _chunks(list(zip(rows, holes)), s.batch_size):
    tokens, valid = sampling.left_pad([r for r, _ in chunk], tok.pad_id)
    out = sampling.infill(m.graphdef, m.params, tokens, valid, mask_id=tok.mask_id,
                          steps=max(n for _, n in chunk), eos_id=tok.eos_id,
                          suppress_eos_logit=s.suppress_eos_logit)
    filled = np.asarray(jax.device_get(out.tokens_BL))
    for r, (_, n) in enumerate(chunk):
      start = int(np.argmax(tokens[r] == tok.mask_id) if n else 0)
      ids = sampling.strip_at_stop(filled[r, start:start + n], tokenizer_lib.stop_ids(tok))
      answers.append(serving.decode_generated(tok, ids))
  return answers


def evaluate(m: serving.LoadedModel, pairs: Sequence[tuple[str, str]], s: Settings) -> dict[str, Any]:
  """Scores one model on `pairs` in every direction it supports; keeps a few answers to look at."""
  tok = m.tokenizer
  gen = s.gen_length or max(len(tok.encode(line)) for pair in pairs for line in pair) + 2
  ctx = [query_context(tok, pairs, i, s.context_pairs) for i in range(len(pairs))]
  firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
  answers = {"forward": _complete(m, [c + tok.encode(a + "\n") for c, a in zip(ctx, firsts)], s, gen)}
  backward_prompts = [c + tok.encode(b + "\n") for c, b in zip(ctx, seconds)]
  if m.is_causal:
    answers["reversal"] = _complete(m, backward_prompts, s, gen)
  else:
    holes = [len(tok.encode(a)) for a in firsts]
    rows = [c + [tok.mask_id] * n + tok.encode("\n" + b) + [tok.eos_id]
            for c, n, b in zip(ctx, holes, seconds)]
    answers["reversal"] = _infill_first_lines(m, rows, holes, s)
    answers["reversal_prompt_only"] = _complete(m, backward_prompts, s, gen)
  result: dict[str, Any] = {"kind": "autoregressive" if m.is_causal else "diffusion", "step": m.step,
                            "gen_length": gen}
  for direction, got in answers.items():
    givens, targets = (firsts, seconds) if direction == "forward" else (seconds, firsts)
    result[direction] = score(got, targets)
    result[direction]["examples"] = [{"given": g, "target": t, "answer": a}
                                     for g, t, a in zip(givens[:3], targets, got)]
  return result


def format_table(models: dict[str, dict[str, Any]]) -> str:
  """model x {forward, reversal} x {exact, substring}, in percent; the diffusion model also gets a
  row for its prompt-only reversal."""
  head = f"{'model':<34}{'fwd exact':>11}{'fwd substr':>12}{'rev exact':>11}{'rev substr':>12}"
  rows = [head, "-" * len(head)]
  for name, r in models.items():
    variants = [("reversal", " (reversal by infilling)" if "reversal_prompt_only" in r else "")]
    if "reversal_prompt_only" in r:
      variants.append(("reversal_prompt_only", " (reversal from a prompt)"))
    for key, label in variants:
      f, b = r["forward"], r[key]
      rows.append(f"{name + label:<34}{f['exact']:>11.1f}{f['substring']:>12.1f}"
                  f"{b['exact']:>11.1f}{b['substring']:>12.1f}")
  return "\n".join(rows)


def _model_name(workdir: str, m: serving.LoadedModel, taken: dict) -> str:
  kind = "autoregressive" if m.is_causal else "diffusion"
  return kind if kind not in taken else f"{kind} ({workdir})"


def run(out_dir: str, s: Settings, *, pairs: Sequence[tuple[str, str]] | None = None,
        workdirs: Sequence[str] = ()) -> dict[str, Any]:
  """The whole experiment: couplets (or `pairs`), two trained models (or the given `workdirs`), scores.

  Prints the table and writes it, with the settings and example answers, to `out_dir/reversal.json`.
  """
  t0 = time.time()
  if s.preset not in PRESETS:
    raise ValueError(f"preset must be one of {PRESETS}; got {s.preset!r}")
  pairs = list(pairs) if pairs is not None else make_couplets(s.num_couplets, s.words_per_line, s.seed)
  if not pairs:
    raise ValueError("no pairs to evaluate")
  os.makedirs(out_dir, exist_ok=True)
  if workdirs:
    for w in workdirs:
      if not files.path(w, tokenizer_lib.TOKENIZER_FILE).exists():
        raise FileNotFoundError(f"--workdir {w} holds no {tokenizer_lib.TOKENIZER_FILE}: "
                                "not a training workdir")
  else:
    workdirs = list(train_models(pairs, out_dir, s).values())
  t_eval = time.time()
  models: dict[str, dict[str, Any]] = {}
  for w in workdirs:
    m = serving.load(w)
    models[_model_name(w, m, models)] = {"workdir": os.path.abspath(w), **evaluate(m, pairs, s)}
  table = format_table(models)
  print(f"reversal experiment: {len(pairs)} pairs\n{table}", flush=True)
  result = {"settings": dataclasses.asdict(s), "num_pairs": len(pairs), "models": models, "table": table,
            "eval_time_s": time.time() - t_eval, "wall_time_s": time.time() - t0}
  files.write_atomic(files.path(out_dir, "reversal.json"), json.dumps(result, indent=2))
  return result
