"""`llada-reversal`: the reversal experiment (REFERENCE §7 in miniature), see llada_jax/reversal.py.

  llada-reversal --output_dir=/tmp/llada_reversal          # train both models on couplets, score them
  llada-reversal --output_dir=/tmp/rev \\
      --workdir=/tmp/llada_reversal/diffusion,/tmp/llada_reversal/autoregressive
  llada-reversal --output_dir=/tmp/rev --pairs=poems.json --workdir=/tmp/my_lm   # a model you trained

Without --workdir it trains a diffusion and an autoregressive model of the same shape on the couplets
written forwards (or on --pairs), then asks each for line 2 given line 1 and line 1 given line 2.
With --workdir it only evaluates those training workdirs (diffusion or causal, read from their config).
"""

from absl import app, flags

from llada_jax import reversal
from llada_jax.cli import common, parsing

_D = reversal.Settings()
_OUT = flags.DEFINE_string("output_dir", "/tmp/llada_reversal",
                           "Where the couplets, both training workdirs and reversal.json go.")
_PAIRS = flags.DEFINE_string("pairs", None, 'JSON list of {"first": ..., "second": ...} to use instead '
                             "of generated couplets.")
_WORKDIRS = flags.DEFINE_list("workdir", [],
                              "Trained workdirs to evaluate instead of training (comma-separated).")
_NUM = flags.DEFINE_integer("num_couplets", _D.num_couplets, "Generated couplets.", lower_bound=1)
_WORDS = flags.DEFINE_integer("words_per_line", _D.words_per_line, "Words per line.", lower_bound=1)
_PRESET = flags.DEFINE_enum("model", _D.preset, list(reversal.PRESETS), "Model shape for both models.")
_STEPS = flags.DEFINE_integer("train_steps", _D.train_steps, "Training steps of each model.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", _D.seed, "Seed of the couplets and of both training runs.")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", _D.train_batch, "Training sequences per step.",
                                    lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", _D.seq_len, "Tokens per packed training sequence.", lower_bound=8)
_LR = flags.DEFINE_float("peak_lr", _D.peak_lr, "Peak learning rate of both models.")
_CONTEXT = flags.DEFINE_integer("context_pairs", _D.context_pairs,
                                "Other couplets placed before each query, as in the packed training stream.",
                                lower_bound=0)
_GEN = flags.DEFINE_integer("gen_length", _D.gen_length, "Tokens generated per line (0: longest line + 2).",
                            lower_bound=0)
_NO_EOS = flags.DEFINE_bool("suppress_eos_logit", _D.suppress_eos_logit,
                            "Diffusion sampling never predicts EOS (the paper's setting for its Instruct "
                            "model; see llada_jax/reversal.py).")
_BATCH = flags.DEFINE_integer("batch_size", _D.batch_size, "Evaluation rows per sampler call.", lower_bound=1)


@common.user_errors("llada-reversal")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  settings = reversal.Settings(num_couplets=_NUM.value, words_per_line=_WORDS.value, preset=_PRESET.value,
                               train_steps=_STEPS.value, seed=_SEED.value, train_batch=_TRAIN_BATCH.value,
                               seq_len=_SEQ.value, peak_lr=_LR.value, context_pairs=_CONTEXT.value,
                               gen_length=_GEN.value,
                               suppress_eos_logit=_NO_EOS.value, batch_size=_BATCH.value)
  pairs = reversal.load_pairs(_PAIRS.value) if _PAIRS.value else None
  result = reversal.run(_OUT.value, settings, pairs=pairs, workdirs=_WORKDIRS.value)
  print(f"wrote {_OUT.value}/reversal.json ({result['wall_time_s']:.0f}s)")
  return 0


def run():
  app.run(main, flags_parser=parsing.flags_parser("llada-reversal"))


if __name__ == "__main__":
  run()
