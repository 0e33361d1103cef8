"""`llada-chat`: interactive multi-turn chat with a fine-tuned (SFT) model.

  llada-chat --workdir=/tmp/llada_demo_sft --block_length=32 --suppress_eos_confidence

Takes the sampling options of `llada-sample` and `llada-eval` with the same defaults
(`llada_jax.sampling_options`): pure diffusion over 64 tokens, EOS untouched. Chat models tend to read
better with semi-autoregressive blocks and EOS committed last, as in the line above.

Type a message and press enter; an empty line or EOF (Ctrl-D) ends the chat. Previous turns (answers
without their EOS padding) are fed back as history. From a notebook use `serving.ChatSession`.
"""

import sys

from absl import app, flags

from llada_jax import sampling_options, serving
from llada_jax.cli import common, parsing, sampling_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of an SFT run.")
_SYSTEM = flags.DEFINE_string("system", None, "Optional system message.")
_SAMPLING = sampling_flags.define()  # --gen_length, --steps, ...: the same in every inference command


@common.user_errors("llada-chat")
def main(argv):
  del argv
  model = serving.load(_WORKDIR.value)
  session = serving.ChatSession(model, system=_SYSTEM.value,
                                **sampling_options.resolve(sampling_flags.values(_SAMPLING),
                                                          block_size=model.block_size))
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
