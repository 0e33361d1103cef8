"""VRPO on your own JSONL preference pairs, starting from an SFT workdir (its model is the reference).

  llada-train --config=configs/vrpo_jsonl.py:demo --workdir=/tmp/my_vrpo \\
      --config.train.init_from=/tmp/my_sft --config.data.paths="('prefs/*.jsonl',)"

Each line is {"prompt": "...", "chosen": "...", "rejected": "..."} with --config.data.sft_format=pairs
(the default here), or {"messages": [... ending with the user's turn], "chosen": ..., "rejected": ...} with
sft_format=messages (a response may also be an {"role": "assistant", "content": ...} message). Field names:
data.prompt_field / data.chosen_field / data.rejected_field. Both responses are rendered with the chat
template and EOS-padded to a common length; a bad line stops the run naming file and line (or is skipped
and counted with data.on_bad_record=skip). Validation: --config.data.eval_paths="('prefs_heldout/*.jsonl',)"
--config.train.eval_every=100. Exact DPO of a causal model: --config.diffusion.objective=ar_dpo
--config.model.causal=True.
"""

from llada_jax.configs import default


def get_config(model: str = "demo"):
  c = default.get_config(model)
  c.data.update(source="jsonl", paths=("prefs/*.jsonl",), sft_format="pairs")
  c.train.update(num_steps=1000, checkpoint_every=200, eval_every=0)  # no held-out pairs until eval_paths
  c.optim.update(peak_lr=1e-5 if model in ("tiny", "demo") else 5e-7)
  if model in ("llada_1b", "llada_8b"):
    c.diffusion.mask_token_id = 4
  return default.preference(c)
