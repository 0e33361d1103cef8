"""The notebooks: each runs top to bottom in a fresh kernel (BUDGET='ci'), and none is committed with outputs.

Both notebooks run at once, each in its own kernel (about a minute of one CPU core each), so the module
costs about as much wall time as the slower one on a 2-core machine.
"""

import asyncio
import os
import pathlib
import re
import time

import pytest

import nbclient  # the [test] extra brings it: a missing package fails, it never skips
import nbformat

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
EXECUTED = ("quickstart", "diffusion_vs_autoregressive")


def kernel_env(tmp: pathlib.Path) -> dict[str, str]:
  """This process's environment for a kernel, without the 8 fake devices conftest.py asks XLA for."""
  env = dict(os.environ)
  flags = [f for f in env.pop("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  env.update(LLADA_NOTEBOOK_BUDGET="ci", JAX_PLATFORMS="cpu", TMPDIR=str(tmp))  # runs go under tmp
  env.pop("MPLBACKEND", None)
  return env


async def _execute(name: str, tmp: pathlib.Path):
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                   resources={"metadata": {"path": str(tmp)}})  # the kernel's cwd
  t0 = time.time()
  await client.async_execute(env=kernel_env(tmp))
  return nb, time.time() - t0


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """{name: (executed notebook, seconds) or the exception it raised}."""
  async def run_all():
    return await asyncio.gather(*(_execute(n, tmp_path_factory.mktemp(n)) for n in EXECUTED),
                                return_exceptions=True)
  return dict(zip(EXECUTED, asyncio.run(run_all())))


def _run(executed, name) -> tuple[str, list]:
  """All text the notebook printed, and its code cells, after checking that no cell failed."""
  got = executed[name]
  if isinstance(got, BaseException):
    raise got  # nbclient's CellExecutionError names the cell and shows its traceback
  nb, seconds = got
  print(f"{name}: {seconds:.0f}s")
  cells = [c for c in nb.cells if c.cell_type == "code"]
  errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  text = "".join(o.get("text", "") for c in cells for o in c.outputs if o.output_type == "stream"
                 and o.name == "stdout")
  return text, cells


def _images(cells) -> int:
  return sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs)


def test_quickstart_runs_top_to_bottom(executed):
  text, cells = _run(executed, "quickstart")
  assert "on 1 cpu device(s)" in text  # not the 8 fake devices of the test process
  assert "step 60/60" in text  # the last chunk of the live-plotted training
  assert text.count("sample: 'the capital of' -> ") == 1
  for rule in ("low_confidence", "random"):  # the remasking comparison
    assert re.search(rf"^{rule} +well formed \d+/8, distinct continuations \d+/8", text, re.M), rule
  assert "checkpoints on disk: [20, 40, 60]" in text
  assert "same greedy completions as before: True" in text
  assert _images(cells) == 1  # the loss plot, redrawn in place
  assert any("<iframe srcdoc=" in o.get("data", {}).get("text/html", "") for c in cells for o in c.outputs)


def test_diffusion_vs_autoregressive_runs_top_to_bottom(executed):
  text, cells = _run(executed, "diffusion_vs_autoregressive")
  assert "diffusion (reversal by infilling)" in text and "autoregressive" in text and "rev substr" in text
  sizes = [line.split()[1] for line in text.splitlines() if "parameters, causal=" in line]
  assert len(sizes) == 2 and sizes[0] == sizes[1]  # equal size
  assert "mc_num=4" in text and "(right)" in text and "(wrong)" in text
  assert _images(cells) == 2  # accuracy bars, likelihood estimates


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebooks_have_no_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, c in enumerate(nb.cells)
           if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
  assert not dirty, (f"{path.name}: cells {dirty} hold outputs or execution counts; clear them before "
                     "committing (jupyter nbconvert --clear-output --inplace)")
