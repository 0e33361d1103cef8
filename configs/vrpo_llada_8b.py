"""VRPO (LLaDA 1.5) of the released LLaDA-8B-Instruct weights (converted by `llada-convert`) on JSONL pairs.

  llada-convert --hf_dir=/models/LLaDA-8B-Instruct --out=/ckpt/llada8b_instruct
  llada-train --config=configs/vrpo_llada_8b.py --workdir=gs://BUCKET/llada8b_vrpo \\
      --config.train.init_from=/ckpt/llada8b_instruct --config.data.paths="('prefs/*.jsonl',)"

The reference is the Instruct model itself (a frozen copy in the train state, sharded like the policy).
From the paper (REFERENCE §9): budget n = 8 samples per ELBO, one mask per timestep, antithetic sharing.
NOT given by the paper, so these are DPO's usual values, each a config field: beta 0.1 (LLaDA2.0's DPO),
peak lr 5e-7 after a 10% warmup then constant, no weight decay, 64 pairs per step, responses up to
2048 tokens with the prompt, one epoch of ~350k pairs (~5.5k steps). A step scores 64 x 2 x 8 = 1024
noisy sequences with the policy (forward and backward) and as many with the reference (forward only):
plan the mesh and grad_accum_steps with `llada-train --dry_run` (BUILD.md has the per-device plan).
"""

from llada_jax.configs import default


def get_config():
  c = default.get_config("llada_8b")
  c.data.update(source="jsonl", paths=("prefs/*.jsonl",), sft_format="pairs")
  c.train.update(batch_size=64, seq_len=2048, grad_accum_steps=8, num_steps=5500, checkpoint_every=500,
                 eval_every=0)
  c.optim.update(peak_lr=5e-7, grad_clip_norm=1.0)
  c.preference.update(beta=0.1, budget=8, n_mask=1, antithetic=True, estimator="t")
  return default.preference(c)
