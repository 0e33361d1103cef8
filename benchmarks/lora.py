"""Full fine-tuning vs LoRA at several ranks: memory per device (XLA's plan of the compiled step) and,
where the model fits this machine, the measured step time.

  python benchmarks/lora.py --config=configs/sft_demo.py --ranks=0,16,64,128 --steps=5     # demo, CPU
  python benchmarks/lora.py --config=configs/sft_llada_8b.py --ranks=0,16,64,128 --plan_only \\
      --num_devices=8 --config.train.batch_size=64 --config.train.grad_accum_steps=8 \\
      --lora_base_dtype=bfloat16                                                            # 8B plan

Rank 0 is full fine-tuning of the config as given; rank r > 0 trains adapters of rank r (alpha 2r, the
config's `lora.targets`) over a frozen base (a random one: speed and memory do not depend on the values;
`train.init_from` is set to a placeholder, never read). Memory (per device): `plan.dry_run` of the same step (params
or adapters, optimizer state, frozen base, activations and temporaries, peak). Time: `--warmup` + `--steps`
real steps on one random batch (train_step.py's loop); `--plan_only` skips them. Flags: train_step.py's
(--config, --steps, --warmup, --num_devices) plus --ranks, --lora_base_dtype and --plan_only.
"""

import dataclasses

import jax
from absl import app, flags

import train_step  # benchmarks/train_step.py: its flags, random batches and timed loop
from llada_jax import config as config_lib, plan, train

_RANKS = flags.DEFINE_list("ranks", ["0", "16", "64", "128"], "LoRA ranks to compare; 0 = full fine-tuning.")
_BASE_DTYPE = flags.DEFINE_string("lora_base_dtype", "", "lora.base_dtype of the LoRA rows ('' = param dtype).")
_PLAN_ONLY = flags.DEFINE_bool("plan_only", False, "Memory plan only, no steps run (shapes this machine cannot run).")


def _setting(config: config_lib.Config, rank: int) -> config_lib.Config:
  if not rank:
    return config
  lora = dataclasses.replace(config.lora, rank=rank, alpha=2.0 * rank, base_dtype=_BASE_DTYPE.value)
  train_cfg = dataclasses.replace(config.train, init_from=config.train.init_from or "/random-base")
  return dataclasses.replace(config, lora=lora, train=train_cfg)


def main(argv):
  del argv
  if train_step._NUM_DEVICES.value:  # pylint: disable=protected-access
    train_step.common.fake_cpu_devices(train_step._NUM_DEVICES.value)  # pylint: disable=protected-access
  base = config_lib.stand_in_tokens(  # pylint: disable=protected-access
      config_lib.from_config_dict(train_step._CONFIG.value))
  steps, warmup = train_step._STEPS.value, train_step._WARMUP.value  # pylint: disable=protected-access
  steps = 0 if _PLAN_ONLY.value else steps
  t = base.train
  print(f"rev {train_step._git_revision()}, jax {jax.__version__}, {jax.device_count()} x "  # pylint: disable=protected-access
        f"{jax.devices()[0].device_kind}; batch {t.batch_size} x {t.seq_len} (accum {t.grad_accum_steps}), "
        f"remat {base.model.remat_policy}, attention {base.model.attention_impl}, targets {list(base.lora.targets)}")
  size = plan.format_bytes
  cols = ["setting", "trained params", "params/adapters", "optimizer", "frozen base", "activations + temps",
          "peak", "step ms", "tokens/s"]
  print("| " + " | ".join(cols) + " |")
  print("|" + "|".join("---" for _ in cols) + "|", flush=True)
  for rank in (int(r) for r in _RANKS.value):
    config = _setting(base, rank)
    s = train.setup(config)
    report = plan.dry_run(s)
    trained = sum(x.size for x in jax.tree.leaves(s.abstract_state.params))
    timed = ["-", "-"]
    if steps:
      step_s, _, _ = train_step.time_steps(s, warmup=warmup, steps=steps)
      timed = [f"{step_s * 1e3:.1f}", f"{t.batch_size * t.seq_len / step_s:.0f}"]
    name = f"LoRA r={rank}" if rank else "full fine-tuning"
    print(f"| {name} | {trained / 1e6:.3f}M | {size(report.params_per_device)} | {size(report.opt_per_device)} | "
          f"{size(report.base_per_device)} | {size(report.temp_per_device)} | {size(report.peak_per_device)} | "
          + " | ".join(timed) + " |", flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
