"""Real-data runs as a user makes them: pre-train on local files, then SFT from that checkpoint."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

import cli_forks
from conftest import tiny_config
from llada_jax import config as config_lib, objectives, serving, train
from llada_jax.configs import default
from llada_jax.data import corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sft_eval_loss(cfg, s, params, batch):
  keys = jax.random.split(jax.random.key(7), 16)
  f = jax.jit(lambda p: jax.vmap(lambda k: train._loss(cfg, s.graphdef, p, batch, k)[0])(keys).mean())
  return float(f(jax.device_get(params)))


def test_sft_from_pretrained_checkpoint_lowers_sft_loss(tmp_path, devices):
  pre_cfg = tiny_config(**{"train.num_steps": 30, "train.num_samples": 0, "optim.warmup_steps": 3})
  pre = train.train_and_evaluate(pre_cfg, str(tmp_path / "pre"))
  c = default.get_config("tiny")
  c.data.update(num_documents=300)
  c.train.update(seq_len=64, num_steps=60, num_samples=2)
  c.optim.update(peak_lr=3e-3)
  sft_cfg = config_lib.from_config_dict(default.sft(c, init_from=str(tmp_path / "pre")))
  post = train.train_and_evaluate(sft_cfg, str(tmp_path / "sft"))
  assert post["step"] == 60 and len(train.print_samples(sft_cfg, post)) == 2
  # The tokenizer is inherited from the pre-trained run, so token ids mean the same thing.
  assert (tmp_path / "sft" / "tokenizer.model").read_bytes() == (tmp_path / "pre" / "tokenizer.model").read_bytes()
  held = config_lib.from_config_dict(default.sft(c.copy_and_resolve_references(), init_from=str(tmp_path / "pre")))
  batch = next(objectives.training_data(held, str(tmp_path / "sft")).iterator)
  s = train.setup(sft_cfg)
  before = _sft_eval_loss(sft_cfg, s, pre["state"].params, batch)
  after = _sft_eval_loss(sft_cfg, s, post["state"].params, batch)
  assert after < 0.9 * before, (before, after)


def test_sft_starts_from_the_pretrained_parameters(pretrained_workdir, tmp_path, devices):
  pre = pathlib.Path(pretrained_workdir)  # conftest's shared tiny pre-training run
  pre_params = serving.load(str(pre)).params
  c = default.get_config("tiny")
  c.train.update(seq_len=48, num_steps=1, num_samples=0)
  c.optim.update(peak_lr=1e-12, weight_decay=0.0)  # one step that cannot move the parameters visibly
  sft_cfg = config_lib.from_config_dict(default.sft(c, init_from=str(pre / "checkpoints")))
  post = train.train_and_evaluate(sft_cfg, str(tmp_path / "sft"))
  pre_leaves = jax.tree.leaves(jax.device_get(pre_params))
  post_leaves = jax.tree.leaves(jax.device_get(post["state"].params))
  assert len(pre_leaves) == len(post_leaves)
  for a, b in zip(pre_leaves, post_leaves):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert int(post["state"].step) == 1  # a fresh step counter (and optimizer), not the pre-train's
  assert (tmp_path / "sft" / "tokenizer.model").read_bytes() == (pre / "tokenizer.model").read_bytes()


def test_sft_from_a_folder_without_tokenizer_fails_clearly(tmp_path):
  c = default.get_config("tiny")
  c.train.update(seq_len=64, num_steps=2)
  (tmp_path / "empty").mkdir()
  cfg = config_lib.from_config_dict(default.sft(c, init_from=str(tmp_path / "empty")))
  with pytest.raises(FileNotFoundError, match="train.init_from.*tokenizer"):
    train.train_and_evaluate(cfg, str(tmp_path / "sft"))


def _cli(*args):
  return cli_forks.shared().run("llada_jax.cli.train", args)


def test_user_files_pretrain_then_jsonl_sft_with_two_config_files(tmp_path):
  """The README path: configs/pretrain_text.py on the user's text, configs/sft_jsonl.py on their chats."""
  text_dir = tmp_path / "data"
  text_dir.mkdir()
  docs = corpus.generate_documents(400, seed=5)
  for i in range(2):
    (text_dir / f"part{i}.txt").write_text("\n".join(d.replace("\n", " ") for d in docs[i::2]) + "\n")
  chats = tmp_path / "chats.jsonl"
  with open(chats, "w") as f:
    for i in range(40):
      f.write(json.dumps({"messages": [
          {"role": "user", "content": f"what is {i} plus 1?"},
          {"role": "assistant", "content": f"{i} plus 1 is {i + 1}."},
          {"role": "user", "content": "and plus 2?"},
          {"role": "assistant", "content": f"{i} plus 2 is {i + 2}."}]}) + "\n")
  pre = _cli(f"--config={REPO}/configs/pretrain_text.py:tiny", f"--workdir={tmp_path / 'pre'}",
             f"--config.data.paths=('{text_dir}/*.txt',)", "--config.train.num_steps=4",
             "--config.optim.warmup_steps=1")
  assert pre.returncode == 0, pre.stderr[-3000:]
  assert "pre-training data: 400 documents (text)" in pre.stdout
  sft = _cli(f"--config={REPO}/configs/sft_jsonl.py:tiny", f"--workdir={tmp_path / 'sft'}",
             f"--config.data.paths=('{chats}',)", f"--config.train.init_from={tmp_path / 'pre'}",
             "--config.train.num_steps=4", "--config.train.seq_len=48")
  assert sft.returncode == 0, sft.stderr[-3000:]
  assert "SFT data: 40 conversations (jsonl)" in sft.stdout and "initialised parameters from step 4" in sft.stdout
  assert "sample: 'what is 0 plus 1?' -> " in sft.stdout
  bad = _cli(f"--config={REPO}/configs/pretrain_text.py:tiny", f"--workdir={tmp_path / 'bad'}",
             f"--config.data.paths=('{tmp_path}/nothing*.txt',)")
  assert bad.returncode == 1 and "nothing*.txt" in bad.stderr and "Traceback" not in bad.stderr


def test_block_sft_continues_a_pure_checkpoint_and_every_entry_point_samples_it(pretrained_workdir, tmp_path,
                                                                                   devices):
  """A pure-diffusion checkpoint continued as a block model (init_from; a block-size schedule 4 -> 8), then
  served: `complete` runs `generate_blocks`, the harness scores the block-wise ELBO."""
  from llada_jax import harness, sampling, sampling_options
  c = default.get_config("tiny")
  c.train.update(seq_len=64, num_steps=2, num_samples=1, eval_every=2, eval_batches=1)
  c.block.schedule = ((4, 1),)
  cfg = config_lib.from_config_dict(default.block(c, block_size=8, init_from=pretrained_workdir, sft=True))
  summary = train.train_and_evaluate(cfg, str(tmp_path / "block"))
  assert summary["step"] == 2 and np.isfinite(summary["metrics"]["loss"])
  # It starts from the pure model's parameters: the block size shapes none of them.
  pure = serving.load(pretrained_workdir)
  loaded = serving.load(str(tmp_path / "block"))
  assert loaded.block_size == 8 and pure.block_size == 0 and loaded.chat
  prompt = loaded.encode_prompt("what is 3 plus 4?")
  options = sampling_options.resolve({"gen_length": 12, "threshold": 0.9}, block_size=loaded.block_size)
  assert (options["steps"], options["block_length"]) == (8, 8)
  got = loaded.complete([], prompt_ids=[prompt], **options)[0]
  tokens, valid = sampling.left_pad([prompt], loaded.tokenizer.pad_id)
  want = sampling.generate_blocks(loaded.graphdef, loaded.params, tokens, valid, block_size=8,
                                  mask_id=loaded.mask_id, eos_id=loaded.tokenizer.eos_id,
                                  eot_id=loaded.tokenizer.piece_to_id("<|eot_id|>"), rng=jax.random.key(0),
                                  gen_length=12, steps=8, block_length=8, threshold=0.9)
  assert got.raw_ids == np.asarray(want.tokens_BL)[0, len(prompt):].tolist() and len(got.raw_ids) == 12
  with pytest.raises(ValueError, match="block_length"):
    loaded.complete([], prompt_ids=[prompt], gen_length=12, block_length=4)
  lm = harness.LladaLM(model=loaded, mc_num=4, batch_size=4)
  assert lm.scorer.blocks
  (score, _), = lm.loglikelihood([type("R", (), {"args": ("what is 3 plus 4?", " 7")})()])
  assert np.isfinite(score) and score < 0
