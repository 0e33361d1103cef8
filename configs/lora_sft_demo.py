"""LoRA SFT of the README demo model on the built-in procedural chat set: configs/sft_demo.py with the
pre-trained parameters frozen and rank-16 adapters on q, k, v and the up projection trained instead,
plus the embedding and output-head rows of the chat template's three pieces, which the demo's
pre-training never saw (without them the adapters cannot learn to end an answer with <|eot_id|>).

  llada-train --config=configs/demo.py --workdir=/tmp/llada_demo                 # pre-train first
  llada-train --config=configs/lora_sft_demo.py --workdir=/tmp/llada_demo_lora   # then LoRA SFT from it
  llada-sample --workdir=/tmp/llada_demo_lora --prompt="what is 3 plus 4?"       # base + adapters, merged
  llada-export --workdir=/tmp/llada_demo_lora --out=/tmp/llada_demo_lora_peft --adapter   # PEFT files

Same data, schedule and steps as the full SFT; the adapters take a 4x larger rate (BENCHMARKS.md
compares the two runs' validation loss, memory and step time).
"""

from llada_jax.configs import default


def get_config():
  c = default.get_config("demo")
  c.data.update(num_documents=5000)
  c.train.update(num_steps=300, checkpoint_every=100)
  c = default.sft(c, init_from="/tmp/llada_demo")
  return default.lora(c, rank=16, alpha=32.0, peak_lr=2e-3,
                      trainable_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
