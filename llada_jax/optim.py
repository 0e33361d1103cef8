"""AdamW with the Warmup-Stable-Decay schedule of LLaDA (REFERENCE §6), built from optax parts."""

from __future__ import annotations

import re

import jax
import optax

from llada_jax.config import OptimConfig


def wsd_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup -> stable peak -> optional lower stage -> linear decay; phases of 0 steps are skipped.

  LLaDA 8B: 2000 warmup steps to 4e-4, hold, 1e-4 (stage2_lr_ratio=0.25), then linear to 1e-5.
  """
  peak = cfg.peak_lr
  stage2 = peak * cfg.stage2_lr_ratio
  decay_from = stage2 if cfg.stage2_steps else peak
  stable = num_steps - cfg.warmup_steps - cfg.stage2_steps - cfg.decay_steps
  phases = [
      (cfg.warmup_steps, optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1))),
      (stable, optax.constant_schedule(peak)),
      (cfg.stage2_steps, optax.constant_schedule(stage2)),
      (cfg.decay_steps, optax.linear_schedule(decay_from, peak * cfg.final_lr_ratio, max(cfg.decay_steps, 1))),
  ]
  phases = [(n, s) for n, s in phases if n > 0] or [(1, optax.constant_schedule(peak))]
  boundaries, total = [], 0
  for n, _ in phases[:-1]:
    total += n
    boundaries.append(total)
  return optax.join_schedules([s for _, s in phases], boundaries)


def decay_mask(params, patterns: tuple[str, ...]):
  """True for parameters that get weight decay: those whose '/'-joined path matches no pattern."""
  regex = re.compile("|".join(re.escape(p) for p in patterns)) if patterns else None

  def keep(path, _):
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return regex is None or regex.search(name) is None

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = wsd_schedule(cfg, num_steps)
  # mu_dtype: a bfloat16 first moment saves 2 bytes/param; the second moment keeps the parameter dtype.
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                      mask=lambda p: decay_mask(p, cfg.no_decay_patterns), mu_dtype=cfg.mu_dtype or None)
  parts = ([optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []) + [adamw]
  return optax.chain(*parts), schedule
