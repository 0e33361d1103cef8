"""`llada-sample`: complete prompts with a trained model.

  llada-sample --workdir=/tmp/llada_demo --prompt="the capital of" --gen_length=32 --steps=32
  llada-sample --workdir=... --prompt_file=prompts.txt --block_length=8 --output_json=out.json
  llada-sample --workdir=... --prompt_ids=1,57,23 --show_steps --html=/tmp/decode.html
"""

import json

from absl import app, flags

from llada_jax import sampling_options, serving, visualize
from llada_jax.cli import common, parsing, sampling_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints/, tokenizer.model).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt text (repeat for a batch).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File with one prompt per line.")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", [], "A prompt as comma-separated token ids.")
_CHAT = flags.DEFINE_enum("chat", "auto", ["auto", "true", "false"],
                          "Wrap prompts in the chat template (auto: if the model was fine-tuned with SFT).")
_SAMPLING = sampling_flags.define()  # --gen_length, --steps, ...: the same in every inference command
_JSON = flags.DEFINE_string("output_json", None, "Write prompts, generated ids, text and steps here.")
_SHOW = flags.DEFINE_bool("show_steps", False, "Print the answer filling in, one line per step.")
_HTML = flags.DEFINE_string("html", None, "Write an animated HTML view of the first prompt's decode here.")


def _prompts() -> tuple[list[str], list[list[int]] | None]:
  texts = list(_PROMPT.value)
  if _PROMPT_FILE.value:
    try:
      with open(_PROMPT_FILE.value, encoding="utf-8") as f:
        from_file = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
      raise FileNotFoundError(f"--prompt_file {_PROMPT_FILE.value}: {e.strerror}") from e
    except UnicodeDecodeError as e:
      raise ValueError(f"--prompt_file {_PROMPT_FILE.value} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not from_file:
      raise ValueError(f"--prompt_file {_PROMPT_FILE.value} holds no prompt (only empty lines); write one "
                       "prompt per line")
    texts += from_file
  if _PROMPT_IDS.value:
    try:
      return [], [[int(i) for i in _PROMPT_IDS.value]]
    except ValueError as e:
      raise ValueError(f"--prompt_ids must be comma-separated integers: {e}") from e
  if not texts:
    raise ValueError("give a prompt: --prompt, --prompt_file or --prompt_ids")
  return texts, None


@common.user_errors("llada-sample")
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}: give a prompt as --prompt='TEXT' (quoted), and every "
                     "other option as --flag=value")
  texts, ids = _prompts()
  model = serving.load(_WORKDIR.value, _STEP.value)
  chat = None if _CHAT.value == "auto" else _CHAT.value == "true"
  if ids is not None and max(ids[0], default=-1) >= model.tokenizer.vocab_size:
    raise ValueError(f"--prompt_ids holds ids outside the vocabulary [0, {model.tokenizer.vocab_size})")
  options = sampling_options.resolve(sampling_flags.values(_SAMPLING), block_size=model.block_size)
  results = model.complete(texts, chat=chat, prompt_ids=ids, **options)
  for r in results:
    print(f"{r.prompt!r} -> {r.text!r}  ({r.steps} steps)")
    if _SHOW.value:
      print(visualize.terminal_view(model.tokenizer, r.raw_ids, r.commit_step))
  if _HTML.value:
    r = results[0]
    with open(_HTML.value, "w", encoding="utf-8") as f:
      f.write(visualize.html_view(model.tokenizer, r.prompt, r.raw_ids, r.commit_step))
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump([{"prompt": r.prompt, "token_ids": r.token_ids, "text": r.text, "steps": r.steps}
                 for r in results], f, indent=2)
  return 0


def run():
  flags.mark_flag_as_required("workdir")
  app.run(main, flags_parser=parsing.flags_parser("llada-sample"))


if __name__ == "__main__":
  run()
