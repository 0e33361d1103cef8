"""SFT on your own JSONL chats, starting from a pre-trained workdir.

  llada-train --config=configs/sft_jsonl.py:demo --workdir=/tmp/my_lm_sft \\
      --config.train.init_from=/tmp/my_lm --config.data.paths="('chats/*.jsonl',)"

Each line is {"messages": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]} ending with an
assistant turn; an n-turn dialogue trains as n (history -> answer) pairs. For prompt/response pairs use
--config.data.sft_format=pairs (fields data.prompt_field / data.response_field). The tokenizer is taken
from the init_from workdir. Validation: --config.data.eval_paths="('chats_heldout/*.jsonl',)"
--config.train.eval_every=200.
"""

from llada_jax.configs import default


def get_config(model: str = "demo"):
  c = default.get_config(model)
  c.data.update(source="jsonl", paths=("chats/*.jsonl",))
  c.train.eval_every = 0  # no held-out chats until data.eval_paths names some
  if model in ("llada_1b", "llada_8b"):
    c.diffusion.mask_token_id = 4
  return default.sft(c)
