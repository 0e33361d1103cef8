"""The bad-input catalogue: malformed config values, flags, config files, data files, prompts,
checkpoints, Hugging Face folders and tokenizer files, each handed to the real command as a user would.

Every case must fail with exit status != 0 and end stderr with ONE line `PROG: error: ...` that names
the offending thing (field, flag, path, tensor) and, where the message can, says what to do or what is
allowed; no traceback. `--verbose` shows the traceback instead (VERBOSE_CASES). docs/errors.md lists
every case with the line it prints; `test_doc_lists_every_case` keeps the two in step.

CI has 2 cores and each command start costs ~4 s of imports, so the cases do not run one by one as fresh
interpreters: a module fixture writes the inputs, trains ONE tiny workdir (2 steps) and runs every
command, 3 at a time, each in a child forked from a Python that has imported the library already
(tests/cli_forks.py: the command's own `python -m` path, minus the interpreter start); each test only
reads its case's result. tests/test_cli.py and the other CLI tests start real interpreters.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
from typing import NamedTuple

import pytest

import cli_forks
from conftest import command_env
from hf_fixtures import edit_json, write_hf_dir, write_moe_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "errors.md")
MODULES = {"llada-train": "llada_jax.cli.train", "llada-sample": "llada_jax.cli.sample",
           "llada-chat": "llada_jax.cli.chat", "llada-eval": "llada_jax.cli.evaluate",
           "llada-convert": "llada_jax.cli.convert", "llada-export": "llada_jax.cli.export",
           "llada-tokenizer": "llada_jax.cli.tokenizer", "llada-serve": "llada_jax.cli.serve"}
# One CPU device: conftest's 8 fake devices would only slow every start.
ENV = command_env()
WORKERS = 3
STEP = 2  # the one checkpoint of the trained workdir


class Case(NamedTuple):
  id: str
  kind: str
  argv: tuple[str, ...]    # script and arguments; {NAME} is a path of `write_inputs` (or REPO, ROOT, CASE)
  names: str               # the offending thing, as the error line must name it
  hint: str | None = None  # what to do or what is allowed, where the message says so


TINY = "--config={REPO}/configs/tiny.py"
SFT_TINY = "--config={REPO}/configs/sft_tiny.py"
GRPO_TINY = "--config={REPO}/configs/grpo_tiny.py"
MOE_TINY = "--config={REPO}/configs/moe_tiny.py"
RUN = "--workdir={ROOT}/runs/{CASE}"  # a fresh workdir per case: nothing one case writes reaches another
TRAIN = ("llada-train", TINY, RUN)
SAMPLE = ("llada-sample", "--workdir={W}")
SMALL = ("--gen_length=8", "--steps=8", "--block_length=8")  # a valid generation, to isolate one mistake


def _data(source: str, path: str, *more: str) -> tuple[str, ...]:
  return (*TRAIN, f"--config.data.source={source}", f"--config.data.paths=('{path}',)", *more)


CASES = [
    # Config values: out of range, wrong type, unknown field, fields that contradict each other.
    Case("config_int_out_of_range", "config value", (*TRAIN, "--config.model.num_heads=3"),
         "'model.num_heads'", "a divisor of model.d_model=32"),
    Case("config_float_out_of_range", "config value", (*TRAIN, "--config.optim.peak_lr=-0.1"),
         "'optim.peak_lr'", "a number in (0.0, 1.0]"),
    Case("config_bad_choice", "config value", (*TRAIN, "--config.model.remat_policy=sometimes"),
         "'model.remat_policy'", "one of ('none', 'full', 'dots'"),
    Case("config_mask_id_outside_vocab", "config value", (*TRAIN, "--config.diffusion.mask_token_id=9999"),
         "'diffusion.mask_token_id'", "an id inside the vocabulary, in [0, 255]"),
    Case("config_seq_len_over_max", "config value", (*TRAIN, "--config.train.seq_len=8192"),
         "'train.seq_len'", "at most model.max_seq_len=4096"),
    Case("config_causal_without_ar", "config value", (*TRAIN, "--config.model.causal=True"),
         "'model.causal'", "False for diffusion.objective='pretrain' (causal objectives: ['ar', 'ar_dpo'])"),
    Case("config_schedule_longer_than_run", "config value", (*TRAIN, "--config.optim.warmup_steps=30"),
         "'optim.warmup_steps'", "warmup+stage2+decay steps <= train.num_steps=20"),
    Case("config_grad_accum_not_divisor", "config value", (*TRAIN, "--config.train.grad_accum_steps=3"),
         "'train.grad_accum_steps'", "a divisor of train.batch_size=8"),
    Case("config_file_source_without_paths", "config value", (*TRAIN, "--config.data.source=text"),
         "'data.paths'", "one or more file paths or globs"),
    Case("config_batch_not_divisible_by_devices", "config value", (*TRAIN, "--dry_run", "--num_devices=3"),
         "'train.batch_size'", "must be a multiple of the 3 devices"),
    Case("config_moe_topk_over_experts", "config value", ("llada-train", MOE_TINY, RUN,
                                                          "--config.model.experts_per_token=9"),
         "'model.experts_per_token'", "an integer in [1, 8]"),
    Case("config_expert_axis_without_ep", "config value", ("llada-train", MOE_TINY, RUN, "--config.mesh.expert=2"),
         "'mesh.expert'", "only 'fsdp_ep' splits over 'expert'"),
    Case("config_block_size_not_dividing_rows", "config value",
         (*TRAIN, "--config.diffusion.objective=block_diffusion", "--config.model.block_size=5"),
         "'model.block_size'", "a divisor of train.seq_len=32"),
    Case("config_block_size_over_max", "config value",
         (*TRAIN, "--config.diffusion.objective=block_diffusion", "--config.model.block_size=5000"),
         "'model.block_size'", "an integer in [0, 4096]"),
    # Config files: a file of your own with a mistake the command line would not let through.
    Case("config_file_wrong_type", "config file", ("llada-train", "--config={CONFIG_WRONG_TYPE}", RUN),
         "'train.num_steps'", "an integer >= 1; got 'ten'"),
    Case("config_file_unknown_field", "config file", ("llada-train", "--config={CONFIG_UNKNOWN_FIELD}", RUN),
         "['model.d_modle']", "known fields of 'model'"),
    Case("config_file_returns_no_config", "config file", ("llada-train", "--config={CONFIG_RETURNS_LIST}", RUN),
         "got list", "does get_config() in the config file return its ConfigDict?"),
    Case("config_file_section_not_a_dict", "config file", ("llada-train", "--config={CONFIG_BAD_SECTION}", RUN),
         "config section 'train'", "must be a ConfigDict (or dict) of fields; got 100"),
    # Command-line flags.
    Case("flag_unknown", "flag", (*SAMPLE, "--promt=hi"), "'promt'", "Did you mean: prompt"),
    Case("flag_missing_required", "flag", ("llada-sample", "--prompt=hi"), "flag --workdir is required",
         "see llada-sample --helpfull"),
    Case("flag_serve_max_batch_zero", "flag", ("llada-serve", "--workdir={W}", "--max_batch=0"),
         "max_batch=0", "must be >= 1"),
    Case("flag_serve_bad_buckets", "flag", ("llada-serve", "--workdir={W}", "--prompt_buckets=16,lots"),
         "--prompt_buckets", "comma-separated integers"),
    Case("flag_missing_required_out", "flag", ("llada-convert", "--hf_dir={HF}"), "flag --out is required"),
    Case("flag_bad_enum", "flag", (*SAMPLE, "--prompt=hi", "--remasking=best"), "--remasking=best",
         "<low_confidence|random|margin|entropy>"),
    Case("flag_not_an_integer", "flag", (*SAMPLE, "--prompt=hi", "--gen_length=many"), "--gen_length=many",
         "invalid literal for int()"),
    Case("flag_unquoted_prompt", "flag", (*SAMPLE, "the", "capital"), "['the', 'capital']",
         "--prompt='TEXT' (quoted)"),
    Case("flag_no_command", "flag", ("llada-tokenizer", "--text=hi"), "give one command",
         "train, encode or decode"),
    Case("train_flag_unknown", "flag", ("llada-train", TINY, "--workdri={ROOT}/runs/x"), "'workdri'",
         "Did you mean: workdir"),
    Case("train_config_field_unknown", "flag", (*TRAIN, "--config.model.d_modle=64"),
         "no such config field 'd_modle'", 'Did you mean "d_model"'),
    Case("train_config_value_unparsable", "flag", (*TRAIN, "--config.train.num_steps=ten"),
         "--config.train.num_steps=ten", "invalid literal for int()"),
    Case("train_stray_arguments", "flag", (*TRAIN, "extra", "words"), "unexpected arguments: ['extra', 'words']"),
    Case("config_file_missing", "config file", ("llada-train", "--config={ROOT}/nope.py", RUN),
         "nope.py", "No such file or directory"),
    Case("flag_missing_tasks", "flag", ("llada-eval", "--workdir={ROOT}/never"), "--tasks",
         "give --tasks=NAME[,NAME...]"),
    # The sampling options every inference command shares (llada_jax/sampling_options.py).
    Case("chat_flag_bad_remasking", "flag", ("llada-chat", "--workdir={ROOT}/never", "--remasking=best"),
         "--remasking=best", "<low_confidence|random|margin|entropy>"),
    Case("eval_flag_steps_not_an_integer", "flag",
         ("llada-eval", "--workdir={ROOT}/never", "--tasks=my_mc", "--steps=many"), "--steps=many",
         "invalid literal for int()"),
    # Data files.
    Case("data_glob_matches_nothing", "data file", _data("text", "{DATA}/none*.txt"),
         "'{DATA}/none*.txt' matches no file"),
    Case("data_relative_glob_matches_nothing", "data file", _data("text", "corpus_that_is_not_here/*.txt"),
         "'corpus_that_is_not_here/*.txt' matches no file",
         "relative paths start from the current directory"),
    Case("data_directory_not_glob", "data file", _data("text", "{DATA}"), "'{DATA}' matches no file",
         "use a glob such as 'dir/*.txt'"),
    Case("data_jsonl_malformed_line", "data file", _data("jsonl", "{DATA}/bad_line.jsonl"),
         "{DATA}/bad_line.jsonl:2: not valid JSON", "data.on_bad_record='skip'"),
    Case("data_jsonl_wrong_text_field", "data file", _data("jsonl", "{DATA}/other_field.jsonl"),
         "{DATA}/other_field.jsonl:1: no field 'text' (data.text_field)", "the record has ['body']"),
    Case("data_empty_file", "data file", _data("text", "{DATA}/empty.txt"), "{DATA}/empty.txt",
         "holds no documents"),
    Case("data_binary_as_text", "data file", _data("text", "{DATA}/garbage.bin"), "{DATA}/garbage.bin:1",
         "not valid UTF-8"),
    Case("data_text_invalid_utf8_line", "data file", _data("text", "{DATA}/bad_utf8.txt"),
         "{DATA}/bad_utf8.txt:3: not valid UTF-8", "data.on_bad_record='skip'"),
    Case("data_binary_as_array_record", "data file",
         _data("array_record", "{DATA}/garbage.bin", "--config.data.tokenizer_path={W}/tokenizer.model"),
         "{DATA}/garbage.bin: not a readable ArrayRecord file", "expects files written by"),
    Case("data_sft_last_turn_not_assistant", "data file",
         ("llada-train", SFT_TINY, RUN, "--config.data.source=jsonl",
          "--config.data.paths=('{DATA}/no_answer.jsonl',)"),
         "{DATA}/no_answer.jsonl:1", "the last message must be the assistant's"),
    Case("data_sft_pair_without_response", "data file",
         ("llada-train", SFT_TINY, RUN, "--config.data.source=jsonl", "--config.data.sft_format=pairs",
          "--config.data.paths=('{DATA}/no_response.jsonl',)"),
         "{DATA}/no_response.jsonl:1: field 'response'", "missing or not a string"),
    Case("data_preference_same_responses", "data file",
         (*TRAIN, "--config.diffusion.objective=vrpo", "--config.data.source=jsonl", "--config.data.sft_format=pairs",
          "--config.data.paths=('{DATA}/same_responses.jsonl',)"),
         "{DATA}/same_responses.jsonl:1: fields 'chosen' and 'rejected' hold the same response",
         "a pair must differ"),
    Case("data_preference_without_rejected", "data file",
         (*TRAIN, "--config.diffusion.objective=vrpo", "--config.data.source=jsonl", "--config.data.sft_format=pairs",
          "--config.data.paths=('{DATA}/no_rejected.jsonl',)"),
         "{DATA}/no_rejected.jsonl:1: no field 'rejected'", "the record has ['chosen', 'prompt']"),
    # Prompts and generation lengths (llada-sample on the trained workdir).
    Case("prompt_none", "prompt", SAMPLE, "give a prompt", "--prompt, --prompt_file or --prompt_ids"),
    Case("prompt_file_only_empty_lines", "prompt", (*SAMPLE, "--prompt_file={DATA}/blank.txt"),
         "--prompt_file {DATA}/blank.txt", "holds no prompt"),
    Case("prompt_file_missing", "prompt", (*SAMPLE, "--prompt_file={DATA}/no_prompts.txt"),
         "--prompt_file {DATA}/no_prompts.txt", "No such file or directory"),
    Case("prompt_longer_than_model", "prompt", (*SAMPLE, "--prompt_file={DATA}/long_prompt.txt", *SMALL),
         "the prompt is", "shorten the prompt to at most 4088 tokens"),
    Case("prompt_ids_not_integers", "prompt", (*SAMPLE, "--prompt_ids=1,x"), "--prompt_ids",
         "comma-separated integers"),
    Case("prompt_ids_outside_vocab", "prompt", (*SAMPLE, "--prompt_ids=1,99999", *SMALL), "--prompt_ids",
         "[0, 256)"),
    Case("sample_block_not_divisor", "prompt", (*SAMPLE, "--prompt=hi", "--gen_length=32", "--block_length=10"),
         "'block_length'", "a divisor of gen_length=32"),
    Case("sample_steps_not_multiple_of_blocks", "prompt",
         (*SAMPLE, "--prompt=hi", "--gen_length=32", "--block_length=8", "--steps=6"), "'steps'",
         "a multiple of the number of blocks (4 = gen_length / block_length)"),
    Case("sample_more_steps_than_tokens", "prompt",
         (*SAMPLE, "--prompt=hi", "--gen_length=8", "--block_length=8", "--steps=16"), "'steps'",
         "at most gen_length=8"),
    Case("sample_gen_length_over_max", "prompt",
         (*SAMPLE, "--prompt=hi", "--gen_length=4096", "--steps=64", "--block_length=64"), "'gen_length'",
         "less than model.max_seq_len=4096"),
    Case("sample_threshold_out_of_range", "prompt", (*SAMPLE, "--prompt=hi", *SMALL, "--threshold=2"),
         "'threshold'", "in (0, 1]"),
    # Checkpoints.
    Case("checkpoint_workdir_missing", "checkpoint", ("llada-sample", "--workdir={ROOT}/no_such_run", "--prompt=hi"),
         "{ROOT}/no_such_run does not exist", "give the --workdir of a training run"),
    Case("checkpoint_none_in_workdir", "checkpoint", ("llada-chat", "--workdir={EMPTY}"),
         "no checkpoint in {EMPTY}", "train first"),
    Case("checkpoint_serve_workdir_missing", "checkpoint", ("llada-serve", "--workdir={ROOT}/no_such_run"),
         "{ROOT}/no_such_run does not exist", "give the --workdir of a training run"),
    Case("checkpoint_step_missing", "checkpoint", (*SAMPLE, "--prompt=hi", "--step=7"),
         "no checkpoint step 7", f"available steps: [{STEP}]"),
    Case("checkpoint_step_file_removed", "checkpoint",
         ("llada-sample", "--workdir={CKPT_NO_CONFIG}", "--prompt=hi"),
         f"{{CKPT_NO_CONFIG}}/checkpoints/{STEP}/config/metadata"),
    Case("checkpoint_config_corrupt", "checkpoint",
         ("llada-export", "--workdir={CKPT_BAD_CONFIG}", "--out={ROOT}/runs/{CASE}"),
         f"{{CKPT_BAD_CONFIG}}/checkpoints/{STEP}/config/metadata", "is not valid JSON"),
    Case("checkpoint_resume_other_shape", "checkpoint",
         ("llada-train", TINY, "--workdir={W_RESUME}", "--config.model.d_model=64"),
         "'model.d_model'=64 differs from 32", "use a new --workdir"),
    Case("checkpoint_init_from_other_shape", "checkpoint",
         ("llada-train", SFT_TINY, RUN, "--config.train.init_from={W}", "--config.model.num_layers=3"),
         "'model.num_layers'=3 differs from 2", "use a new --workdir or the checkpoint's value"),
    Case("checkpoint_init_from_missing", "checkpoint",
         ("llada-train", SFT_TINY, RUN, "--config.train.init_from={ROOT}/no_such_run"),
         "'train.init_from'='{ROOT}/no_such_run' does not exist", "give the --workdir of a pre-training run"),
    # Hugging Face checkpoint folders (llada-convert).
    Case("hf_folder_missing", "hf folder",
         ("llada-convert", "--hf_dir={ROOT}/no_such_hf", "--out={ROOT}/runs/{CASE}"),
         "directory not found: {ROOT}/no_such_hf", "nothing is downloaded"),
    Case("hf_no_config_json", "hf folder", ("llada-convert", "--hf_dir={HF_NO_CONFIG}", "--out={ROOT}/runs/{CASE}"),
         "{HF_NO_CONFIG}/config.json not found", "needs its config.json"),
    Case("hf_config_key_missing", "hf folder", ("llada-convert", "--hf_dir={HF_NO_KEY}", "--out={ROOT}/runs/{CASE}"),
         "lacks the key 'n_heads'", "needed to build the model"),
    Case("hf_unsupported_architecture", "hf folder",
         ("llada-convert", "--hf_dir={HF_BIAS}", "--out={ROOT}/runs/{CASE}"),
         "'include_bias'=True is not supported", "llada_jax implements False"),
    Case("hf_moe_expert_bias_in_weights", "hf folder",
         ("llada-convert", "--hf_dir={HF_MOE_BIAS}", "--out={ROOT}/runs/{CASE}"),
         "'moe_router_enable_expert_bias'=True is not supported", "llada_jax implements False"),
    Case("hf_pickle_only", "hf folder", ("llada-convert", "--hf_dir={HF_PICKLE}", "--out={ROOT}/runs/{CASE}"),
         "pytorch_model.bin", "save_pretrained(dir, safe_serialization=True)"),
    Case("hf_tensor_missing", "hf folder", ("llada-convert", "--hf_dir={HF_NO_TENSOR}", "--out={ROOT}/runs/{CASE}"),
         "model.transformer.blocks.1.up_proj.weight", "a weight file is incomplete"),
    Case("hf_tensor_wrong_shape", "hf folder",
         ("llada-convert", "--hf_dir={HF_BAD_SHAPE}", "--out={ROOT}/runs/{CASE}"),
         "'model.transformer.blocks.0.k_proj.weight' in model.safetensors has shape [32, 32]",
         "config.json implies [16, 32]"),
    Case("hf_safetensors_truncated", "hf folder",
         ("llada-convert", "--hf_dir={HF_TRUNCATED}", "--out={ROOT}/runs/{CASE}"),
         "{HF_TRUNCATED}/model.safetensors is not a readable safetensors file", "copy or download it again"),
    Case("hf_out_holds_checkpoints", "hf folder", ("llada-convert", "--hf_dir={HF}", "--out={TAKEN}"),
         "{TAKEN}/checkpoints already holds checkpoints", "convert into a new --out"),
    Case("hf_export_out_not_empty", "hf folder", ("llada-export", "--workdir={W}", "--out={HF}"),
         "{HF} is not empty", "export into a new directory"),
    # LoRA: adapters need a base; export and import of adapters.
    Case("config_lora_without_base", "config value", (*TRAIN, "--config.lora.rank=4"),
         "'train.init_from'", "when lora.rank > 0"),
    Case("config_lora_bad_target", "config value",
         (*TRAIN, "--config.lora.rank=4", "--config.train.init_from={W}", "--config.lora.targets=('q_proj','w_gate')"),
         "'lora.targets'", "distinct names from ('q_proj', 'k_proj', 'v_proj', 'attn_out', 'ff_gate', 'ff_up', 'ff_down')"),
    Case("config_lora_unknown_token", "config value",
         (*TRAIN, "--config.lora.rank=4", "--config.train.init_from={W}", "--config.lora.trainable_tokens=('<|eom|>',)"),
         "'lora.trainable_tokens'", "'<|eom|>' is not one of its pieces"),
    # RL: the rollouts' options, the reward functions.
    Case("config_grpo_bad_remasking", "config value", ("llada-train", GRPO_TINY, RUN, "--config.grpo.remasking=lowest"),
         "'grpo.remasking'", "one of ('low_confidence', 'random', 'margin', 'entropy')"),
    Case("config_grpo_unknown_reward", "config value", ("llada-train", GRPO_TINY, RUN, "--config.grpo.rewards=('corect',)"),
         "config field 'grpo.rewards' has an unknown reward function 'corect'", "'package.module:function'"),
    Case("config_grpo_reward_raises", "config value",
         ("llada-train", GRPO_TINY, RUN, "--config.grpo.rewards=('correct','math:sqrt')"),
         "reward function 'math:sqrt' raised TypeError", "on completion 0"),
    Case("export_merge_not_lora", "checkpoint", ("llada-export", "--workdir={W}", "--out={ROOT}/runs/{CASE}", "--merge"),
         "--merge: {W} holds no LoRA adapters", "export it without --merge"),
    Case("export_adapter_not_lora", "checkpoint",
         ("llada-export", "--workdir={W}", "--out={ROOT}/runs/{CASE}", "--adapter"),
         "--adapter: {W} holds no LoRA adapters", "export its weights without --adapter"),
    Case("convert_adapter_without_base", "flag", ("llada-convert", "--adapter={EMPTY}", "--out={ROOT}/runs/{CASE}"),
         "--adapter needs --base=WORKDIR", "the converted or trained workdir of its base model"),
    Case("convert_adapter_folder_incomplete", "hf folder",
         ("llada-convert", "--adapter={EMPTY}", "--base={W}", "--out={ROOT}/runs/{CASE}"),
         "PEFT adapter folder {EMPTY} lacks adapter_config.json", "a .bin adapter must be re-saved"),
    # Tokenizer files.
    Case("tokenizer_missing", "tokenizer",
         ("llada-tokenizer", "encode", "--tokenizer={DATA}/missing.model", "--text=hi"),
         "tokenizer file not found: {DATA}/missing.model", "give a sentencepiece .model"),
    Case("tokenizer_sentencepiece_corrupt", "tokenizer",
         ("llada-tokenizer", "encode", "--tokenizer={DATA}/bad.model", "--text=hi"),
         "{DATA}/bad.model is not a sentencepiece model", "written by llada-tokenizer train"),
    Case("tokenizer_without_mask_piece", "tokenizer",
         ("llada-tokenizer", "encode", "--tokenizer={DATA}/no_mask.model", "--text=hi"),
         "{DATA}/no_mask.model", "no mask piece '<|mask|>'"),
    Case("tokenizer_json_corrupt", "tokenizer",
         ("llada-tokenizer", "encode", "--tokenizer={DATA}/bad.json", "--text=hi"),
         "{DATA}/bad.json is not a usable Hugging Face tokenizer", "tokenizers library"),
    Case("tokenizer_json_mask_not_in_vocab", "tokenizer",
         ("llada-tokenizer", "encode", "--tokenizer={HF_BAD_MASK}", "--text=hi"),
         "mask_token of {HF_BAD_MASK}/tokenizer_config.json is '<|no_such_piece|>'", "lacks"),
    Case("tokenizer_path_missing_for_training", "tokenizer",
         (*TRAIN, "--config.data.tokenizer_path={DATA}/missing.model"), "{DATA}/missing.model"),
    Case("tokenizer_corrupt_in_workdir", "tokenizer",
         ("llada-sample", "--workdir={W_BAD_TOKENIZER}", "--prompt=hi"),
         "{W_BAD_TOKENIZER}/tokenizer.model", "written by llada-tokenizer train"),
]

# --verbose: the same kinds of mistakes show the whole traceback, ending with the exception's line.
VERBOSE_CASES = [
    Case("verbose_config_value", "config value", (*TRAIN, "--config.model.num_heads=3", "--verbose"),
         "ValueError: config field 'model.num_heads'"),
    Case("verbose_checkpoint_step", "checkpoint", (*SAMPLE, "--prompt=hi", "--step=7", "--verbose"),
         "FileNotFoundError: no checkpoint step 7"),
    Case("verbose_flag", "flag", (*SAMPLE, "--remasking=best", "--verbose"),
         "IllegalFlagValueError: flag --remasking=best"),
]

# Inputs made from the trained workdir; cases that use one of them wait for the training run.
FROM_WORKDIR = {"W", "W_RESUME", "W_BAD_TOKENIZER", "CKPT_NO_CONFIG", "CKPT_BAD_CONFIG"}
_PLACEHOLDER = re.compile(r"\{([A-Z][A-Z_]*)\}")


def fill(text: str, paths: dict[str, str]) -> str:
  return _PLACEHOLDER.sub(lambda m: paths[m.group(1)], text)


def _write(path: str, data: str | bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  return path


def _edit_safetensors(path: str, change) -> None:
  from safetensors import numpy as st_numpy
  tensors = st_numpy.load_file(path)
  change(tensors)
  st_numpy.save_file(tensors, path, metadata={"format": "pt"})


def write_inputs(root: str) -> dict[str, str]:
  """Every malformed input that does not need the trained workdir; {placeholder: path}."""
  import numpy as np
  import sentencepiece as spm

  data = os.path.join(root, "data")
  _write(f"{data}/small.txt", "the quiet cat sees the old dog\nthe red king walks near the river\n")
  _write(f"{data}/bad_line.jsonl", '{"text": "a b c"}\n{"text": "d e f"\n')
  _write(f"{data}/other_field.jsonl", '{"body": "a b c"}\n')
  _write(f"{data}/empty.txt", "")
  _write(f"{data}/garbage.bin", bytes(range(128, 256)) * 64)
  _write(f"{data}/bad_utf8.txt", b"the quiet cat sees the old dog\nthe red king\nwalks \xff near\nthe river\n" * 20)
  _write(f"{data}/no_answer.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
  _write(f"{data}/no_response.jsonl", json.dumps({"prompt": "hi"}) + "\n")
  _write(f"{data}/same_responses.jsonl", json.dumps({"prompt": "hi", "chosen": "hello", "rejected": " hello "}) + "\n")
  _write(f"{data}/no_rejected.jsonl", json.dumps({"prompt": "hi", "chosen": "hello"}) + "\n")
  _write(f"{data}/blank.txt", "\n   \n\n")
  _write(f"{data}/long_prompt.txt", "the cat " * 3000 + "\n")
  _write(f"{data}/bad.model", b"not a sentencepiece model")
  _write(f"{data}/bad.json", '{"version": ')
  model = spm.SentencePieceTrainer  # a valid sentencepiece model, trained without llada_jax's pieces
  with open(f"{data}/no_mask.model", "wb") as f:
    model.train(sentence_iterator=iter(["the quiet cat sees the old dog"] * 50), model_writer=f,
                vocab_size=30, hard_vocab_limit=False, minloglevel=2)

  configs = os.path.join(root, "configs")
  header = "from llada_jax.configs import default\n\n\ndef get_config():\n  c = default.get_config('tiny')\n"
  paths = {
      "REPO": REPO, "ROOT": root, "DATA": data, "EMPTY": os.path.join(root, "empty"),
      # A ConfigDict refuses 'ten' for an int field as the file runs; a plain dict carries it to validation.
      "CONFIG_WRONG_TYPE": _write(f"{configs}/wrong_type.py", header + "  d = c.to_dict()\n"
                                  "  d['train']['num_steps'] = 'ten'\n  return d\n"),
      "CONFIG_UNKNOWN_FIELD": _write(f"{configs}/unknown_field.py", header + "  c.model.d_modle = 64\n  return c\n"),
      "CONFIG_RETURNS_LIST": _write(f"{configs}/returns_list.py", header + "  return [c]\n"),
      "CONFIG_BAD_SECTION": _write(f"{configs}/bad_section.py", header + "  return {**c.to_dict(), 'train': 100}\n"),
  }
  os.makedirs(paths["EMPTY"])
  os.makedirs(os.path.join(root, "taken", "checkpoints", "0"))
  paths["TAKEN"] = os.path.join(root, "taken")

  hf_dir = os.path.join(root, "hf", "base")
  write_hf_dir(hf_dir)
  paths["HF"] = hf_dir

  def broken(name: str, damage) -> None:
    folder = os.path.join(root, "hf", name.lower())
    shutil.copytree(hf_dir, folder)
    damage(folder)
    paths[name] = folder

  broken("HF_NO_CONFIG", lambda d: os.remove(f"{d}/config.json"))
  broken("HF_NO_KEY", lambda d: edit_json(f"{d}/config.json", n_heads=None))
  broken("HF_BIAS", lambda d: edit_json(f"{d}/config.json", include_bias=True))
  broken("HF_PICKLE", lambda d: (os.remove(f"{d}/model.safetensors"),
                                 _write(f"{d}/pytorch_model.bin", b"\x80\x04not really a pickle")))
  broken("HF_NO_TENSOR", lambda d: _edit_safetensors(
      f"{d}/model.safetensors", lambda t: t.pop("model.transformer.blocks.1.up_proj.weight")))
  broken("HF_BAD_SHAPE", lambda d: _edit_safetensors(
      f"{d}/model.safetensors", lambda t: t.update({"model.transformer.blocks.0.k_proj.weight":
                                                        np.zeros((32, 32), np.float32)})))
  broken("HF_TRUNCATED", lambda d: os.truncate(f"{d}/model.safetensors", 100_000))
  broken("HF_BAD_MASK", lambda d: edit_json(f"{d}/tokenizer_config.json", mask_token="<|no_such_piece|>"))
  moe_dir = os.path.join(root, "hf", "hf_moe_bias")
  write_moe_dir(moe_dir)
  edit_json(f"{moe_dir}/config.json", moe_router_enable_expert_bias=True)
  paths["HF_MOE_BIAS"] = moe_dir
  return paths


def damaged_workdirs(root: str, workdir: str) -> dict[str, str]:
  """Copies of the trained workdir, each broken in one way."""
  out = {}

  def copy(name: str, damage) -> None:
    folder = os.path.join(root, "workdirs", name.lower())
    shutil.copytree(workdir, folder)
    damage(folder)
    out[name] = folder

  copy("W_RESUME", lambda d: None)  # resumed with another shape (the run would write into it)
  copy("W_BAD_TOKENIZER", lambda d: _write(f"{d}/tokenizer.model", b"\x00garbage"))
  copy("CKPT_NO_CONFIG", lambda d: os.remove(f"{d}/checkpoints/{STEP}/config/metadata"))
  copy("CKPT_BAD_CONFIG", lambda d: _write(f"{d}/checkpoints/{STEP}/config/metadata", '{"model": {'))
  return out


def run(forks: cli_forks.Forks, argv: tuple[str, ...], paths: dict[str, str],
        case_id: str = "") -> subprocess.CompletedProcess:
  args = [fill(a, paths | {"CASE": case_id}) for a in argv[1:]]
  return forks.run(MODULES[argv[0]], args, timeout=600)


def _needs_workdir(case: Case) -> bool:
  return any(_PLACEHOLDER.findall(a) and set(_PLACEHOLDER.findall(a)) & FROM_WORKDIR for a in case.argv)


def run_catalogue(root: str, cases=CASES + VERBOSE_CASES) -> tuple[dict[str, str], dict]:
  """Runs every case, 3 at a time; the training run starts first and the cases that need its workdir
  start when it is done. Returns the paths and {case id: CompletedProcess}."""
  paths = write_inputs(root)
  paths["W"] = os.path.join(root, "workdir")
  train = ("llada-train", TINY, "--workdir={W}", f"--config.train.num_steps={STEP}",
           "--config.optim.warmup_steps=1", "--config.train.num_samples=0", "--config.data.num_documents=50")
  forks = cli_forks.Forks(WORKERS, env=ENV, cwd=REPO)
  with forks, concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
    trained = pool.submit(run, forks, train, paths)
    futures = {c.id: pool.submit(run, forks, c.argv, paths, c.id) for c in cases if not _needs_workdir(c)}
    r = trained.result()
    if r.returncode != 0:
      pool.shutdown(cancel_futures=True)
      pytest.fail(f"training the shared workdir failed:\n{r.stderr[-3000:]}")
    paths.update(damaged_workdirs(root, paths["W"]))
    futures |= {c.id: pool.submit(run, forks, c.argv, paths, c.id) for c in cases if _needs_workdir(c)}
    return paths, {k: f.result() for k, f in futures.items()}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
  return run_catalogue(str(tmp_path_factory.mktemp("bad_inputs")))


def _lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_fails_in_one_line_naming_it(catalogue, case):
  paths, results = catalogue
  r, prog = results[case.id], case.argv[0]
  shown = f"{shlex.join(case.argv)}\n--- stderr ---\n{r.stderr[-3000:]}"
  assert r.returncode != 0, shown
  assert "Traceback" not in r.stderr, shown
  lines = _lines(r.stderr)
  # No native wrapper's text either (sentencepiece's "RuntimeError: INTERNAL" with its "At:" stack).
  assert "INTERNAL" not in r.stderr and not any(line.startswith("At:") for line in lines), shown
  assert lines and lines[-1].startswith(f"{prog}: error: "), shown
  assert sum(line.startswith(f"{prog}: error:") for line in lines) == 1, shown
  assert fill(case.names, paths) in lines[-1], shown
  if case.hint is not None:
    assert fill(case.hint, paths) in lines[-1], shown


@pytest.mark.parametrize("case", VERBOSE_CASES, ids=lambda c: c.id)
def test_verbose_shows_the_traceback(catalogue, case):
  paths, results = catalogue
  r = results[case.id]
  assert r.returncode != 0, r.stderr[-3000:]
  assert "Traceback (most recent call last)" in r.stderr, r.stderr[-3000:]
  assert fill(case.names, paths) in r.stderr, r.stderr[-3000:]
  assert not any(line.startswith(f"{case.argv[0]}: error:") for line in _lines(r.stderr)), r.stderr[-3000:]


def doc_rows() -> dict[str, str]:
  """{case id: table row} of docs/errors.md's catalogue (rows start with | `case_id` |)."""
  rows = {}
  with open(DOC, encoding="utf-8") as f:
    for line in f:
      m = re.match(r"\| `([a-z0-9_]+)` \|", line)
      if m:
        assert m.group(1) not in rows, f"{m.group(1)} is listed twice in docs/errors.md"
        rows[m.group(1)] = line
  return rows


def test_doc_lists_every_case():
  rows = doc_rows()
  ids = [c.id for c in CASES]
  assert len(set(ids)) == len(ids) and not set(ids) & {c.id for c in VERBOSE_CASES}
  assert sorted(set(ids) - set(rows)) == [], "cases missing from docs/errors.md"
  assert sorted(set(rows) - set(ids)) == [], "docs/errors.md lists cases that tests/test_bad_inputs.py lacks"
  for case in CASES:
    assert f"{case.argv[0]}: error: " in rows[case.id], f"{case.id}: the doc row must show the error line"
    assert case.kind in rows[case.id], f"{case.id}: the doc row must give the kind '{case.kind}'"


def test_catalogue_covers_every_kind():
  counts = {}
  for case in CASES:
    counts[case.kind] = counts.get(case.kind, 0) + 1
  assert len(CASES) >= 45
  assert set(counts) == {"config value", "config file", "flag", "data file", "prompt", "checkpoint", "hf folder",
                         "tokenizer"}
  assert min(counts.values()) >= 4, counts


def test_flag_errors_become_one_line():
  """cli/parsing.one_line on what absl and ml_collections' config flag raise while parsing, including the
  config-file errors of llada-train (whose parser is llada_jax/cli/train.py's to wire)."""
  from absl import flags
  from llada_jax.cli import parsing

  required = flags.IllegalFlagValueError("flag --workdir=None: Flag --workdir must have a value other than None.")
  assert parsing.one_line(required) == "flag --workdir is required"
  # ml_collections: a misspelt override is an AttributeError holding the repr of a two-line KeyError text.
  typo = AttributeError(KeyError("'d_modle'\nDid you mean \"d_model\" instead of \"d_modle\"?"))
  argv = ["llada-train", "--config=configs/tiny.py", "--config.model.d_modle=64"]
  assert parsing.one_line(typo, argv) == ("flag --config.model.d_modle=64: no such config field 'd_modle'; "
                                          "Did you mean \"d_model\" instead of \"d_modle\"?")
  # A config file that raises: the file is named, its error kept.
  assert parsing.one_line(RuntimeError("boom"), argv[:2]) == "--config=configs/tiny.py: RuntimeError: boom"
  # A flags.Error carrying a config file's traceback keeps its first line and the exception's line.
  wrapped = flags.IllegalFlagValueError("flag --config=c.py:huge: Error whilst parsing config file:\n\n  Traceback "
                                        "(most recent call last):\n    ...\n  ValueError: no variant 'huge'")
  assert parsing.one_line(wrapped) == ("flag --config=c.py:huge: Error whilst parsing config file: "
                                       "ValueError: no variant 'huge'")
  assert "\n" not in parsing.one_line(wrapped)
