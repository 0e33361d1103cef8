"""The lm-evaluation-harness adapter and `llada-eval`, on a local multiple-choice task (no network):
lm-eval's accuracy equals the one computed straight from `evaluate.Scorer`, rolling likelihoods are
the Scorer's, generation stops where asked, and bad input gives one-line errors."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before lm_eval imports datasets / huggingface_hub
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import lm_eval  # noqa: E402  (the [test] extra brings it: a missing package fails, it never skips)
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llada_jax import evaluate, harness, sampling_options  # noqa: E402

TASK = "llada_local_mc"
QUESTIONS = [  # (question, choices, index of the answer)
    ("the capital of the north is", ["the river", "the city", "the moon"], 1),
    ("one plus two is", ["three", "seven", "twelve", "four"], 0),
    ("the sea is", ["blue", "green", "red"], 0),
    ("the king rode to the", ["west", "south", "east", "north"], 3),
    ("a bird sat on the", ["the city", "a dog", "the moon"], 0),
    ("two plus two is", ["four", "three", "seven"], 0),
]
LIKELIHOOD = dict(mc_num=4, batch_size=4)


def _prompt(question: str) -> str:
  return f"Question: {question}\nAnswer:"


@pytest.fixture(scope="module")
def workdir(pretrained_workdir):
  """conftest's shared tiny pre-training run (read-only)."""
  return pathlib.Path(pretrained_workdir)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  """An lm-eval task folder: one YAML reading a local JSONL (absolute paths; its own datasets cache)."""
  root = tmp_path_factory.mktemp("tasks")
  data = root / "questions.jsonl"
  data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                          for q, c, a in QUESTIONS))
  (root / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {root / "hf_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
  return root


@pytest.fixture(scope="module")
def lm(workdir):
  return harness.LladaLM(str(workdir), **LIKELIHOOD)


def _request(kind, *args):
  return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_multiple_choice_accuracy_is_the_scorers(lm, task_dir):
  tok = lm.model.tokenizer
  prompts, answers = [], []
  for q, choices, _ in QUESTIONS:  # lm-eval's order: document by document, choices in order
    ctx = tok.encode(_prompt(q))
    for c in choices:
      cont = tok.encode(_prompt(q) + " " + c)[len(ctx):]
      assert tok.decode(cont) == " " + c and len(cont) > 1  # several tokens: the Monte Carlo path
      prompts.append([tok.eos_id] + ctx)
      answers.append(cont)
  scores = lm.scorer.loglikelihood(prompts, answers, evaluate.LikelihoodConfig(**LIKELIHOOD))
  per_doc, at = [], 0
  for _, choices, _ in QUESTIONS:
    per_doc.append(scores[at:at + len(choices)])
    at += len(choices)
  acc = np.mean([np.argmax(s) == a for s, (_, _, a) in zip(per_doc, QUESTIONS)])

  out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], log_samples=True,
                                task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
  assert out["results"][TASK]["acc,none"] == pytest.approx(acc)
  for sample in sorted(out["samples"][TASK], key=lambda s: s["doc_id"]):
    got = [r[0] for r in sample["filtered_resps"]]
    np.testing.assert_allclose(got, per_doc[sample["doc_id"]], rtol=1e-6)


def test_rolling_one_token_and_greedy_requests(lm):
  tok = lm.model.tokenizer
  text = "the quiet cat sat by the river. one plus two is three."
  (rolling,) = lm.loglikelihood_rolling([_request("loglikelihood_rolling", text)])
  want = lm.scorer.rolling_loglikelihood([tok.encode(text)], evaluate.LikelihoodConfig(**LIKELIHOOD))
  assert rolling == pytest.approx(float(want[0]), rel=1e-6)
  # One token: exact with one sample, so it equals any mc_num's estimate.
  ctx = "the capital of"
  one = lm.loglikelihood([_request("loglikelihood", ctx, " is")])[0][0]
  ids = [tok.eos_id] + tok.encode(ctx)
  assert tok.encode(ctx + " is")[len(ids) - 1:] == tok.encode(" is") and len(tok.encode(" is")) == 1
  assert one == pytest.approx(float(lm.scorer.loglikelihood([ids], [tok.encode(" is")])[0]), rel=1e-5)
  # is_greedy, when asked for: true for what the greedy reverse process writes, false for another text.
  checker = harness.LladaLM(model=lm.model, check_greedy=True, **LIKELIHOOD)
  greedy = [int(i) for i in np.asarray(lm.model.generate_ids([ids], gen_length=2, steps=2,
                                                             block_length=2).tokens_BL[0, len(ids):])]
  text = tok.decode(greedy)
  assert checker._encode_pair(ctx, text)[1] == greedy  # the text round-trips to the same ids
  other = " the river" if text != " the river" else " the city"
  flags = [g for _, g in checker.loglikelihood([_request("loglikelihood", ctx, text),
                                                _request("loglikelihood", ctx, other)])]
  assert flags == [True, False]


def test_generate_until_budget_and_stop_strings(lm):
  tok = lm.model.tokenizer
  ctx = "the capital of"
  blocks = harness.LladaLM(model=lm.model, block_length=4)
  # max_gen_toks=6 with blocks of 4: the sampler writes 8 tokens, the answer keeps 6.
  (free,) = blocks.generate_until([_request("generate_until", ctx, {"max_gen_toks": 6})])
  full = lm.model.complete([], prompt_ids=[[tok.eos_id] + tok.encode(ctx)], gen_length=8, steps=8,
                           block_length=4)[0]
  assert free == tok.decode(full.token_ids[:6]) and free
  stop = free[len(free) // 2]
  (cut,) = blocks.generate_until([_request("generate_until", ctx, {"max_gen_toks": 6, "until": [stop]})])
  assert cut == free[:free.index(stop)]


def test_sampling_options_are_the_shared_declaration(lm):
  """The harness takes the inference commands' option set with their defaults, also as lm-eval's
  --model_args text, and derives the unset lengths from each request's budget by the shared rule."""
  assert lm.options == sampling_options.defaults()
  assert lm.get_model_info()["generation"] == sampling_options.defaults()
  args = "gen_length=None,block_length=4,kv_cache=prefix,early_exit=true,threshold=0.9,seed=3,mc_num=2"
  typed = harness.LladaLM.create_from_arg_string(args, {"model": lm.model, "batch_size": 2})
  assert typed.options == {**sampling_options.defaults(), "block_length": 4, "kv_cache": "prefix",
                           "early_exit": True, "threshold": 0.9, "seed": 3}
  assert typed.likelihood.seed == 3 and typed.likelihood.mc_num == 2
  until, budget, options = typed._generation_options({"max_gen_toks": 6, "until": ["."]})
  assert (until, budget) == (["."], 6)
  assert options == {k: v for k, v in sampling_options.resolve(typed.options, budget=6).items() if k != "seed"}
  assert (options["gen_length"], options["steps"], options["block_length"]) == (8, 8, 4)
  with pytest.raises(ValueError, match="LladaLM: unknown option 'top_k'.*the sampling options are gen_length"):
    harness.LladaLM.create_from_arg_string("top_k=5", {"model": lm.model})


@pytest.mark.parametrize("kwargs,named", [
    ({"gen_lenght": 8}, "unknown option 'gen_lenght' (did you mean 'gen_length'?)"),
    ({"mc_nun": 8}, "unknown option 'mc_nun' (did you mean 'mc_num'?)"),
    ({"remasking": "best"}, "sampling option 'remasking' must be one of"),
])
def test_unknown_or_bad_option_is_refused_naming_it(tmp_path, kwargs, named):
  # Before anything is loaded: the workdir does not even exist.
  with pytest.raises(ValueError, match=re.escape(named)):
    harness.LladaLM(str(tmp_path / "never"), **kwargs)


def test_missing_tokenizer_is_a_clear_error(workdir, tmp_path):
  bare = tmp_path / "bare"
  shutil.copytree(workdir, bare)
  (bare / "tokenizer.model").unlink()
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    harness.LladaLM(str(bare))


def _llada_eval(*args):
  return subprocess.run([sys.executable, "-m", "llada_jax.cli.evaluate", *args], capture_output=True,
                        text=True, timeout=600)


def test_cli_on_a_local_task(workdir, task_dir, tmp_path):
  out = tmp_path / "results.json"
  r = _llada_eval(f"--workdir={workdir}", f"--tasks={TASK}", f"--include_path={task_dir}", "--limit=4",
                  f"--output={out}", "--mc_num=4", "--batch_size=4", "--threshold=0.9", "--early_exit")
  assert r.returncode == 0, r.stderr[-3000:]
  assert TASK in r.stdout and " acc " in r.stdout
  results = json.loads(out.read_text())
  assert 0 <= results["results"][TASK]["acc,none"] <= 1
  assert results["config"]["likelihood"]["mc_num"] == 4
  assert results["config"]["generation"] == {**sampling_options.defaults(), "threshold": 0.9, "early_exit": True}
  bad = _llada_eval(f"--workdir={workdir}", "--tasks=no_such_task", f"--include_path={task_dir}")
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  error = [line for line in bad.stderr.splitlines() if "error" in line]
  assert len(error) == 1 and "no_such_task" in error[0] and "--include_path" in error[0]
