"""Loading a trained workdir, `llada-sample`, `llada-chat` and the reverse-process views."""

import json
import pathlib

import pytest

import cli_forks
from llada_jax import serving, visualize


@pytest.fixture(scope="module")
def workdirs(pretrained_workdir, sft_workdir):
  """conftest's shared runs: 4 pre-training steps, and 2 SFT steps from them (read-only)."""
  return pathlib.Path(pretrained_workdir), pathlib.Path(sft_workdir)


def _run(module, *args, stdin=None):
  return cli_forks.shared().run(module, args, stdin=stdin)


def test_load_and_complete_in_process(workdirs):
  pre, sft = workdirs
  model = serving.load(str(pre))
  assert model.step == 4 and not model.chat
  out = model.complete(["the capital of", "12 plus"], gen_length=8, steps=8, block_length=4)
  assert len(out) == 2 and all(len(r.raw_ids) == 8 and r.steps == 8 for r in out)
  assert sorted(out[0].commit_step) == list(range(8))  # 8 steps, one token each, each position once
  chat_model = serving.load(str(sft))
  assert chat_model.chat
  # SFT wrote the flag into the checkpoint's config (what serving reads), pre-training left it off.
  assert [json.loads((w / "config.json").read_text())["model"]["chat"] for w in (pre, sft)] == [False, True]
  assert chat_model.encode_prompt("hi")[0] == chat_model.tokenizer.bos_id


def test_chat_session_feeds_history_back(workdirs):
  model = serving.load(str(workdirs[1]))
  chat = serving.ChatSession(model, system="be brief", gen_length=8, steps=8, block_length=8)
  first = chat.send("what is 1 plus 1?")
  chat.send("and 2 plus 2?")
  roles = [m["role"] for m in chat.messages]
  assert roles == ["system", "user", "assistant", "user", "assistant"]
  assert chat.messages[2]["content"] == first.text
  assert "<|mask|>" not in first.text


def test_terminal_and_html_views(workdirs):
  model = serving.load(str(workdirs[0]))
  r = model.complete(["the quiet cat"], gen_length=8, steps=4, block_length=8)[0]
  view = visualize.terminal_view(model.tokenizer, r.raw_ids, r.commit_step).splitlines()
  assert len(view) == 4  # 4 steps, each committing 2 tokens
  assert visualize.MASK_GLYPH in view[0] and visualize.MASK_GLYPH not in view[-1]
  page = visualize.html_view(model.tokenizer, r.prompt, r.raw_ids, r.commit_step)
  assert page.startswith("<!doctype html>") and json.dumps(r.commit_step[0]) in page


def test_sample_cli(workdirs, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("the capital of\ncount: 1 2\n")
  out_json, html = tmp_path / "out.json", tmp_path / "view.html"
  r = _run("llada_jax.cli.sample", f"--workdir={workdirs[0]}", f"--prompt_file={prompts}",
           "--gen_length=8", "--steps=8", "--block_length=4", "--remasking=margin", "--show_steps",
           f"--output_json={out_json}", f"--html={html}", "--threshold=0.9")
  assert r.returncode == 0, r.stderr[-2000:]
  rows = json.loads(out_json.read_text())
  assert [row["prompt"] for row in rows] == ["the capital of", "count: 1 2"]
  assert all({"token_ids", "text", "steps"} <= set(row) and 1 <= row["steps"] <= 8 for row in rows)
  assert html.read_text().startswith("<!doctype html>") and " | " in r.stdout
  bad = _run("llada_jax.cli.sample", f"--workdir={workdirs[0]}", "--prompt=x", "--gen_length=10",
             "--block_length=4")
  assert bad.returncode == 1 and "block_length" in bad.stderr and "Traceback" not in bad.stderr


def test_chat_cli_two_turns(workdirs):
  # Steps and block length left unset: the shared rule makes both gen_length.
  r = _run("llada_jax.cli.chat", f"--workdir={workdirs[1]}", "--gen_length=8", "--remasking=margin",
           "--suppress_eos_confidence", "--early_exit", stdin="what is 1 plus 1?\nand 2 plus 2?\n\n")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.count("llada> ") == 2
