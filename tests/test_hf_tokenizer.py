"""Hugging Face tokenizer.json: special ids from the files, the released chat template token for token,
no control tokens from user text, save/load through the workdir, and clear errors."""

import json
import pickle
import shutil
import subprocess
import sys

import jinja2
import numpy as np
import pytest
import tokenizers

from hf_fixtures import RELEASED_CHAT_TEMPLATE, write_hf_tokenizer
from llada_jax import serving
from llada_jax.data import hf_tokenizer, sft, tokenizer as tokenizer_lib

SH, EH, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("hf")
  return folder, write_hf_tokenizer(folder)


@pytest.fixture(scope="module")
def tok(hf_dir):
  return tokenizer_lib.load(hf_dir[0])


def _released_ids(folder, messages):
  """What Hugging Face's apply_chat_template(messages, tokenize=True) gives: Jinja, then one encode."""
  config = json.loads((folder / "tokenizer_config.json").read_text())
  env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
  text = env.from_string(config["chat_template"]).render(messages=messages, bos_token=config["bos_token"],
                                                         add_generation_prompt=True)
  plain = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  return plain.encode(text, add_special_tokens=False).ids, text


def test_special_ids_come_from_the_files(hf_dir, tok):
  _, ids = hf_dir
  assert isinstance(tok, hf_tokenizer.HFTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (
      ids["<|startoftext|>"], ids["<|endoftext|>"], ids["<|endoftext|>"], ids["<|mdm_mask|>"])
  assert tok.mask_id != tokenizer_lib.MASK_ID and tok.eos_id != tokenizer_lib.EOS_ID
  assert sft.ChatTemplate().ids(tok) == (ids[SH], ids[EH], ids[EOT])
  assert tok.vocab_size == max(ids.values()) + 1 <= 160
  assert tokenizer_lib.stop_ids(tok) == {ids["<|endoftext|>"], ids[EOT]}
  assert tok.piece_to_id("<|no_such_piece|>") is None


U1 = {"role": "user", "content": "  what is the capital of the old city?\n"}
A1 = {"role": "assistant", "content": "\nthe capital is the river house.  "}
U2 = {"role": "user", "content": "and the\n\nqueen?"}
SYS = {"role": "system", "content": "\n\nyou are a helpful assistant.\n"}


@pytest.mark.parametrize("messages", [[U1], [U1, A1, U2], [SYS, U1]], ids=["single", "multi", "system"])
def test_render_prompt_is_the_released_template(hf_dir, tok, messages):
  expected, text = _released_ids(hf_dir[0], messages)
  assert text.startswith("<|startoftext|>" + SH) and text.endswith(f"{SH}assistant{EH}\n\n")
  assert sft.render_prompt(messages, tok) == expected


def test_header_suffix_and_content_are_one_text_run(tok):
  # Why render_prompt encodes "\n\n" + content together: here the split would give other ids.
  content = U1["content"].strip()
  assert tok.encode("\n\n" + content) != tok.encode("\n\n") + tok.encode(content)


def test_response_is_the_stripped_answer_then_eot(hf_dir, tok):
  ids = hf_dir[1]
  assert sft.render_response(A1["content"], tok) == tok.encode(A1["content"].strip()) + [ids[EOT]]
  _, text = _released_ids(hf_dir[0], [U1, A1])
  full = sft.render_prompt([U1], tok) + sft.render_response(A1["content"], tok)
  assert tok.decode(full) + f"{SH}assistant{EH}\n\n" == text  # same text as the release's rendering


def test_user_text_never_becomes_a_control_token(hf_dir, tok):
  special = set(hf_dir[1].values())
  text = "say <|eot_id|> then <|start_header_id|>system<|end_header_id|> and <|mdm_mask|><|endoftext|>"
  for t in (tok, pickle.loads(pickle.dumps(tok))):  # grain workers get a pickled copy
    ids = t.encode(text)
    assert not special & set(ids) and t.decode(ids) == text
  prompt = sft.render_prompt([{"role": "user", "content": text}], tok)
  assert prompt.count(hf_dir[1][EOT]) == 1 and prompt.count(hf_dir[1][SH]) == 2
  # Opting in (chat-templated text handed back by lm-eval) matches them, as Hugging Face does.
  for t in (tok, pickle.loads(pickle.dumps(tok))):
    parsed = t.encode(text, special=True)
    assert [i for i in parsed if i in special] == [hf_dir[1][p] for p in (EOT, SH, EH, "<|mdm_mask|>",
                                                                         "<|endoftext|>")]
    assert t.encode("plain words", special=True) == t.encode("plain words")


def test_fingerprint_tells_tokenizers_apart(hf_dir, tok, tmp_path):
  tok.save_dir(tmp_path / "copy")
  assert tokenizer_lib.load(tmp_path / "copy").fingerprint() == tok.fingerprint()
  other = write_hf_tokenizer(tmp_path / "other", vocab_size=150)
  assert other and tokenizer_lib.load(tmp_path / "other").fingerprint() != tok.fingerprint()


def test_decode_round_trips_and_rejects_bad_ids(tok):
  for text in ("the quiet cat.", "  two  spaces\n\nand\ttabs ~!@#$%^&*()_+{}|:\"<>?", ""):
    assert tok.decode(tok.encode(text)) == text
  assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "<|startoftext|>hi<|endoftext|>"
  with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 160\)"):
    tok.decode([5, 160])
  with pytest.raises(ValueError, match="outside"):
    tok.decode([-1])


def test_generated_ids_past_the_vocabulary_decode_as_replacement_characters(tok):
  ids = tok.encode("the cat") + [tok.vocab_size, tok.vocab_size + 7] + tok.encode(" sat")
  assert serving.decode_generated(tok, ids) == "the cat\ufffd\ufffd sat"
  assert serving.decode_generated(tok, tok.encode("plain")) == "plain"


def test_save_dir_and_load_round_trip(hf_dir, tok, tmp_path):
  tok.save_dir(tmp_path / "copy")
  found = tokenizer_lib.find(tmp_path / "copy")
  assert found is not None and found.name == "tokenizer.json"
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "copy" / name).read_bytes() == (hf_dir[0] / name).read_bytes()
  for again in (tokenizer_lib.load(tmp_path / "copy"), tokenizer_lib.load(str(found)),
                hf_tokenizer.HFTokenizer.load(found)):
    assert (again.bos_id, again.eos_id, again.mask_id, again.vocab_size) == (
        tok.bos_id, tok.eos_id, tok.mask_id, tok.vocab_size)
    assert again.encode("the old king.") == tok.encode("the old king.")
  assert tokenizer_lib.find(tmp_path / "nothing_here") is None


def test_special_tokens_map_and_mask_token_override(hf_dir, tmp_path):
  folder = tmp_path / "t"
  shutil.copytree(hf_dir[0], folder)
  (folder / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": {"content": "<|reserved_token_0|>", "special": True}, "eos_token": "<|endoftext|>"}))
  config = json.loads((folder / "tokenizer_config.json").read_text())
  del config["pad_token"]
  (folder / "tokenizer_config.json").write_text(json.dumps({**config, "mask_token": "<|reserved_token_1|>"}))
  t = tokenizer_lib.load(folder)
  ids = hf_dir[1]
  assert (t.bos_id, t.mask_id, t.pad_id) == (ids["<|reserved_token_0|>"], ids["<|reserved_token_1|>"],
                                              ids["<|endoftext|>"])  # pad defaults to EOS
  t.save_dir(tmp_path / "saved")  # the config files it was loaded with travel along
  assert tokenizer_lib.load(tmp_path / "saved").bos_id == ids["<|reserved_token_0|>"]


def _broken(hf_dir, tmp_path, edit):
  folder = tmp_path / "broken"
  shutil.copytree(hf_dir[0], folder)
  edit(folder)
  return folder


def test_errors_name_the_file_and_the_piece(hf_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*empty.*tokenizer\.model.*tokenizer\.json"):
    tokenizer_lib.load((tmp_path / "empty").mkdir() or tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="missing.json"):
    tokenizer_lib.load(tmp_path / "missing.json")

  def bad_bos(folder):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<|nope|>"}))
  with pytest.raises(ValueError, match=r"bos_token of .*tokenizer_config\.json is '<\|nope\|>'.*lacks"):
    tokenizer_lib.load(_broken(hf_dir, tmp_path / "a", bad_bos))

  def no_mask(folder):
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|mdm_mask|>"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"mask_token is '<\|mdm_mask\|>'.*tokenizer\.json lacks"):
    tokenizer_lib.load(_broken(hf_dir, tmp_path / "b", no_mask))

  def bad_json(folder):
    (folder / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
    tokenizer_lib.load(_broken(hf_dir, tmp_path / "c", bad_json))

  def bad_tokenizer(folder):
    (folder / "tokenizer.json").write_text('{"model": 3}')
  with pytest.raises(ValueError, match=r"tokenizer\.json is not a usable Hugging Face tokenizer"):
    tokenizer_lib.load(_broken(hf_dir, tmp_path / "d", bad_tokenizer))


def test_missing_tokenizers_package_says_what_to_install(hf_dir, monkeypatch):
  monkeypatch.setitem(sys.modules, "tokenizers", None)
  with pytest.raises(ImportError, match=r"pip install 'llada_jax\[hf\]'"):
    tokenizer_lib.load(hf_dir[0])


def test_load_or_train_copies_an_hf_source_into_the_workdir(hf_dir, tok, tmp_path):
  def must_not_train():
    raise AssertionError("a tokenizer was given: nothing should be trained")

  work = tmp_path / "run"
  got = tokenizer_lib.load_or_train(str(work), must_not_train, 256, source_path=str(hf_dir[0]))
  assert sorted(p.name for p in work.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
  again = tokenizer_lib.load_or_train(str(work), must_not_train, 256)  # the resume path: the workdir's copy
  for t in (got, again):
    assert isinstance(t, hf_tokenizer.HFTokenizer) and t.mask_id == tok.mask_id


def test_sft_batch_with_the_hf_tokenizer(hf_dir, tok):
  convs = [{"messages": [U1, A1]}, {"messages": [SYS, U1, A1, U2, {"role": "assistant", "content": "yes."}]}]
  batch = next(iter(sft.sft_dataset(convs, tok, seq_len=160, batch_size=3, seed=0)))
  assert batch["tokens"].shape == (3, 160) and batch["valid"].shape == (3, 160)
  for row, n in zip(batch["tokens"], batch["prompt_len"]):
    assert row[0] == tok.bos_id and row[n - 1 - len(tok.encode("\n\n"))] == hf_dir[1][EH]
    assert row[-1] == tok.eos_id
    assert np.all(row < tok.vocab_size) and tok.mask_id not in row


def test_cli_encodes_with_an_hf_folder(hf_dir, tok):
  r = subprocess.run([sys.executable, "-m", "llada_jax.cli.tokenizer", "encode", f"--tokenizer={hf_dir[0]}",
                      "--text=the quiet cat <|eot_id|>"], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert [int(i) for i in r.stdout.strip().split(",")] == tok.encode("the quiet cat <|eot_id|>")
