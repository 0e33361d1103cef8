"""`llada-chat`: interactive multi-turn chat with a fine-tuned (SFT) model.

  llada-chat --workdir=/tmp/llada_demo_sft [--gen_length=64 --steps=64 --block_length=32]

Type a message and press enter; an empty line or EOF (Ctrl-D) ends the chat. Previous turns (answers
without their EOS padding) are fed back as history. From a notebook use `serving.ChatSession`.
"""

import sys

from absl import app, flags

from llada_jax import serving
from llada_jax.cli import common, parsing

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of an SFT run.")
_SYSTEM = flags.DEFINE_string("system", None, "Optional system message.")
_GEN = flags.DEFINE_integer("gen_length", 64, "Tokens per answer.")
_STEPS = flags.DEFINE_integer("steps", 64, "Reverse-process steps per answer.")
_BLOCK = flags.DEFINE_integer("block_length", 32, "Semi-autoregressive block length.")
_THRESH = flags.DEFINE_float("threshold", None, "Fast-dLLM confidence threshold in (0, 1].")
_TEMP = flags.DEFINE_float("temperature", 0.0, "Sampling temperature.")
_CACHE = flags.DEFINE_enum("kv_cache", "none", ["none", "prefix", "dual"], "Fast-dLLM block-wise KV cache.")


@common.user_errors("llada-chat")
def main(argv):
  del argv
  model = serving.load(_WORKDIR.value)
  session = serving.ChatSession(model, system=_SYSTEM.value, gen_length=_GEN.value, steps=_STEPS.value,
                                block_length=_BLOCK.value, threshold=_THRESH.value, temperature=_TEMP.value,
                                kv_cache=_CACHE.value, suppress_eos_confidence=True)
  interactive = sys.stdin.isatty()
  while True:
    if interactive:
      print("you> ", end="", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
      break
    print(f"llada> {session.send(line.strip()).text}", flush=True)
  return 0


def run():
  flags.mark_flag_as_required("workdir")
  app.run(main, flags_parser=parsing.flags_parser("llada-chat"))


if __name__ == "__main__":
  run()
