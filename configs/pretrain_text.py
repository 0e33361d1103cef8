"""Pre-train on your own local files: plain text (one document per line) by default.

  llada-train --config=configs/pretrain_text.py:demo --workdir=/tmp/my_lm \\
      --config.data.paths="('data/*.txt',)"
  # JSONL:     --config.data.source=jsonl --config.data.text_field=text
  # TFDS:      --config.data.source=tfds --config.data.tfds_name=lm1b --config.data.tfds_data_dir=DIR
  #            (prepare once: tfds build lm1b --data_dir=DIR --file_format=array_record)

The argument after ':' picks the model preset (tiny, demo, llada_1b, llada_8b). A sentencepiece
tokenizer is trained on a sample of the data into the workdir unless data.tokenizer_path names one.
Validation on held-out files: --config.data.eval_paths="('heldout/*.txt',)" --config.train.eval_every=200.
"""

from llada_jax.configs import default


def get_config(model: str = "demo"):
  c = default.get_config(model)
  c.data.update(source="text", paths=("data/*.txt",), text_unit="line")
  c.train.eval_every = 0  # your files have no held-out split until you name one (data.eval_paths)
  if model in ("llada_1b", "llada_8b"):  # trained here, so our tokenizer's mask id
    c.diffusion.mask_token_id = 4
  return c
