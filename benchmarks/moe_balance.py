"""Does a mixture-of-experts model learn, and do its experts share the work? (REFERENCE §13)

  python benchmarks/moe_balance.py                                   # moe_tiny, 400 steps, aux 0.01 and 0
  python benchmarks/moe_balance.py --config.model.num_experts=16 --steps=800 --aux_weights=0.01

Trains the configured MoE preset (default `configs/moe_tiny.py`: 8 experts, top-2) through the library
(`llada_jax.train.train_and_evaluate`, the built-in corpus, in a fresh workdir per run) once per
`--aux_weights` value of `model.moe_aux_loss_weight`, and prints, per logging window of each run, what the
train step wrote to metrics.jsonl: the loss, the diffusion bound (the loss less the weighted router
losses: comparable across aux weights), the load-balancing loss (k when the router spreads tokens evenly),
`expert_load_max` (the busiest expert's share x E: 1 = perfectly balanced) and the smallest and largest
per-expert share of assignments (1/E each when balanced). Two averages hide imbalance differently: every
figure is a mean over the window's steps and the shares are also means over layers, so `expert_load_max`
(each step's own busiest expert, then averaged) exceeds E x the largest window share whenever the busiest
expert changes from step to step (masked diffusion does that: the [MASK] inputs, up to all of a row at
t ~ 1, tend to go to the same few experts, so a step's balance follows its mask ratios). A verdict line per
run: whether the bound fell from the first window to the last, and the last window's shares.
"""

import contextlib
import json
import os
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

from llada_jax import config as config_lib, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/moe_tiny.py", "An MoE config (num_experts > 0).",
                                          lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps per run.", lower_bound=1)
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Steps per logging window (one table row).", lower_bound=1)
_AUX = flags.DEFINE_list("aux_weights", ["0.01", "0"], "model.moe_aux_loss_weight of each run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent folder of the runs' workdirs (default: a temp dir); "
                               "each run's progress lines go to its train.log there.")
_JSON = flags.DEFINE_string("json", None, "Also write every run's windows to this JSON file.")


def run(config: config_lib.Config, workdir: str) -> list[dict[str, float]]:
  """Trains `config` in `workdir` (its progress lines to workdir/train.log); returns the training windows
  (metrics.jsonl rows that carry router statistics), step order."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "train.log"), "w") as log, contextlib.redirect_stdout(log):
    train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return sorted((r for r in rows if "expert_load_max" in r and "learning_rate" in r), key=lambda r: r["step"])


def summarise(row: dict[str, float], model: config_lib.ModelConfig) -> dict[str, float]:
  """One window's table fields; the bound is the logged loss less the weighted router losses (the window
  means are linear, so the subtraction is exact)."""
  shares = [v for k, v in row.items() if k.startswith("expert_load/")]
  router = model.moe_aux_loss_weight * row["moe_aux_loss"] + model.moe_z_loss_weight * row["moe_z_loss"]
  return {"step": row["step"], "loss": row["loss"], "bound": row["loss"] - router, "aux": row["moe_aux_loss"],
          "z": row["moe_z_loss"], "load_max": row["expert_load_max"], "share_min": min(shares),
          "share_max": max(shares), "dropped": row.get("moe_dropped", 0.0)}


def table(windows: list[dict[str, float]]) -> str:
  lines = ["| step | loss | bound | moe_aux_loss | moe_z_loss | expert_load_max | min share | max share |",
           "|---|---|---|---|---|---|---|---|"]
  lines += [f"| {w['step']} | {w['loss']:.4f} | {w['bound']:.4f} | {w['aux']:.4f} | {w['z']:.4f} | "
            f"{w['load_max']:.3f} | {w['share_min']:.4f} | {w['share_max']:.4f} |" for w in windows]
  return "\n".join(lines)


def verdict(windows: list[dict[str, float]], num_experts: int) -> str:
  first, last = windows[0], windows[-1]
  fell = "fell" if last["bound"] < first["bound"] else "did NOT fall"
  ratio = last["share_max"] / last["share_min"] if last["share_min"] > 0 else float("inf")
  return (f"verdict: bound {fell} from {first['bound']:.4f} (step {first['step']}) to {last['bound']:.4f} "
          f"(step {last['step']}); final expert shares {last['share_min']:.4f}..{last['share_max']:.4f} "
          f"(balanced: {1 / num_experts:.4f}), max/min {ratio:.2f}, busiest x E {last['load_max']:.3f}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax's per-save INFO lines would bury the tables
  base = config_lib.from_config_dict(_CONFIG.value)
  if not base.model.moe:
    raise app.UsageError("--config must be a mixture-of-experts config (model.num_experts > 0)")
  parent = _WORKDIR.value or tempfile.mkdtemp(prefix="llada_moe_balance_")
  m = base.model
  print(f"{config_flags.get_config_filename(flags.FLAGS['config'])}: {m.num_experts} experts, top-"
        f"{m.experts_per_token}, d_model {m.d_model}, expert width {m.mlp_dim}, {m.num_layers} layers; "
        f"{_STEPS.value} steps of {base.train.batch_size} x {base.train.seq_len}, windows of {_LOG_EVERY.value}; "
        f"workdirs under {parent}", flush=True)
  results = {}
  for weight in map(float, _AUX.value):
    c = _CONFIG.value.copy_and_resolve_references()
    c.model.moe_aux_loss_weight = weight
    # Checkpoint only at the end and skip samples and evals: the windows are what this measures.
    c.train.update(num_steps=_STEPS.value, log_every=_LOG_EVERY.value, checkpoint_every=_STEPS.value,
                   num_samples=0, eval_every=0)
    config = config_lib.from_config_dict(c)
    t0 = time.time()
    windows = [summarise(r, config.model) for r in run(config, os.path.join(parent, f"aux_{weight:g}"))]
    print(f"\nmodel.moe_aux_loss_weight={weight:g} (z-loss weight {config.model.moe_z_loss_weight:g}): "
          f"{time.time() - t0:.0f}s", flush=True)
    print(table(windows))
    print(verdict(windows, config.model.num_experts), flush=True)
    results[f"{weight:g}"] = windows
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
