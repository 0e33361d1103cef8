"""`llada-tokenizer`: train a sentencepiece tokenizer on your data, and inspect it (or a Hugging Face one).

  llada-tokenizer train --input='data/*.txt' --vocab_size=8000 --output=/tmp/tok.model
  llada-tokenizer train --format=jsonl --input='data/*.jsonl' --text_field=text --output=tok.model
  llada-tokenizer train --format=tfds --tfds_name=lm1b --tfds_data_dir=DIR --output=tok.model
  llada-tokenizer encode --tokenizer=tok.model --text="the quiet cat"
  llada-tokenizer decode --tokenizer=tok.model --ids=5,17,42
  llada-tokenizer encode --tokenizer=LLaDA-8B-Instruct/ --text="the quiet cat"   # tokenizer.json folder

Trained models carry the special pieces the rest of the package expects (pad, EOS, BOS, unk, the mask
piece and the chat-template pieces) at fixed ids; `--extra_pieces` adds more.
"""

from absl import app, flags

from llada_jax import config as config_lib
from llada_jax.cli import common, parsing
from llada_jax.data import sources, tokenizer as tokenizer_lib

_INPUT = flags.DEFINE_list("input", [], "train: files or globs (comma-separated).")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "jsonl", "tfds"], "train: input format.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "train: JSONL/TFDS field holding the text.")
_TEXT_UNIT = flags.DEFINE_enum("text_unit", "line", ["line", "file"], "train: a document is a line or a file.")
_TFDS_NAME = flags.DEFINE_string("tfds_name", "", "train: TFDS dataset name (prepared, array_record).")
_TFDS_SPLIT = flags.DEFINE_string("tfds_split", "train", "train: TFDS split.")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", "", "train: TFDS data_dir.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8000, "train: vocabulary size.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "train: sentencepiece model type.")
_MAX_DOCS = flags.DEFINE_integer("max_docs", 200000, "train: documents sampled for training.")
_EXTRA = flags.DEFINE_list("extra_pieces", [], "train: additional user-defined pieces.")
_OUTPUT = flags.DEFINE_string("output", "", "train: where to write the .model file.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "encode/decode: a sentencepiece .model, a Hugging Face "
                                  "tokenizer.json, or a folder holding one.")
_TEXT = flags.DEFINE_string("text", None, "encode: text to encode.")
_IDS = flags.DEFINE_list("ids", [], "decode: comma-separated token ids.")

_USAGE = "usage: llada-tokenizer {train|encode|decode} [flags]; see --helpfull"


def _train() -> None:
  if not _OUTPUT.value:
    raise ValueError("--output is required: where to write the tokenizer .model file")
  data = config_lib.DataConfig(
      source=_FORMAT.value, paths=tuple(_INPUT.value), text_field=_TEXT_FIELD.value,
      text_unit=_TEXT_UNIT.value, tfds_name=_TFDS_NAME.value, tfds_split=_TFDS_SPLIT.value,
      tfds_data_dir=_TFDS_DIR.value)
  source = sources.make_source(data)
  tok = tokenizer_lib.train_sentencepiece(sources.sample_texts(source, _MAX_DOCS.value, 0), _VOCAB.value,
                                          _MODEL_TYPE.value, extra_pieces=_EXTRA.value)
  tok.save(_OUTPUT.value)
  print(f"wrote {_OUTPUT.value}: {tok.vocab_size} pieces (pad {tok.pad_id}, eos {tok.eos_id}, "
        f"bos {tok.bos_id}, mask {tok.mask_id}) from {len(source)} documents")


def _load() -> tokenizer_lib.Tokenizer:
  if not _TOKENIZER.value:
    raise ValueError("--tokenizer is required: a sentencepiece .model, a Hugging Face tokenizer.json, or a "
                     "folder holding one")
  return tokenizer_lib.load(_TOKENIZER.value)


@common.user_errors("llada-tokenizer")
def main(argv):
  if len(argv) != 2 or argv[1] not in ("train", "encode", "decode"):
    got = f"got {argv[1:]}" if len(argv) > 1 else "got none"
    raise ValueError(f"give one command, train, encode or decode; {got} ({_USAGE})")
  if argv[1] == "train":
    _train()
  elif argv[1] == "encode":
    if _TEXT.value is None:
      raise ValueError("--text is required for encode")
    print(",".join(str(i) for i in _load().encode(_TEXT.value)))
  else:
    try:
      ids = [int(i) for i in _IDS.value]
    except ValueError as e:
      raise ValueError(f"--ids must be comma-separated integers: {e}") from e
    print(_load().decode(ids))
  return 0


def run():
  app.run(main, flags_parser=parsing.flags_parser("llada-tokenizer"))


if __name__ == "__main__":
  run()
