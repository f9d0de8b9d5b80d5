"""Every bad input of the README's table, and the first line the user sees for it.

Command-line rows run `python -m dlm_jax.train` (in parallel, nothing is compiled); resume rows
call `trainer.train` on a checkpoint written without training (`dlm_jax.train` prints the same
message after 'ERROR: ' and exits with status 2).
"""

import os
import shutil
import subprocess
import sys

import pytest

from dlm_jax.run import api
from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax import config as config_lib
from dlm_jax.run import experiment as exp_lib
from dlm_jax.run import trainer
from tests.tiny import TINY_FLAGS, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (extra args, start of the first line on stderr).
CLI_CASES = {
    "unknown_config_field": (["--config.optim.learning_rate=1e-3"],
                             "ERROR: Unknown config field(s): config.optim.learning_rate."),
    "wrong_type": (["--config.optim.lr=fast"],
                   "ERROR: flag --config.optim.lr=fast: could not convert string to float: 'fast'"),
    "unknown_flag": (["--workdirr=/tmp/x"], "ERROR: Unknown command line flag 'workdirr'."),
    "missing_workdir": (["NO_WORKDIR"], "ERROR: --config and --workdir are required"),
    "missing_config_file": (["--config=configs/no_such_config.py"],
                            "ERROR: --config file 'configs/no_such_config.py' does not exist"),
    "positional_argument": (["train"], "ERROR: Unexpected arguments: ['train']"),
    "coordinator_without_count": (["--coordinator_address=127.0.0.1:1234"],
                                  "ERROR: --coordinator_address needs --num_processes and "
                                  "--process_id too."),
    "mesh_does_not_fit": (["--config.mesh.data=3"],
                          "ERROR: config.mesh {'data': 3, 'fsdp': 1, 'tensor': 1} does not divide "
                          "the 8 available devices."),
    "missing_text_data": (["--config.data.source=text", "--config.data.path=/no/such/corpus.txt"],
                          "ERROR: config.data.path: '/no/such/corpus.txt' does not exist."),
}


def _first_line(text):
  lines = [l for l in text.splitlines()
           if l.strip() and not l.startswith(("I1", "W1", "WARNING:", "E0000", "E1"))]
  return lines[0] if lines else ""


def test_command_line_errors(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  procs = {}
  for name, (extra, _) in CLI_CASES.items():
    args = [a for a in extra if a != "NO_WORKDIR"]
    base = ["--config=configs/mdlm_tiny.py", *TINY_FLAGS]
    if "NO_WORKDIR" not in extra:
      base.append(f"--workdir={tmp_path / name}")
    procs[name] = subprocess.Popen([sys.executable, "-m", "dlm_jax.train", *base, *args],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    first = _first_line(err)
    assert first.startswith(CLI_CASES[name][1]), (name, err[-2000:])
    assert proc.returncode == 2, (name, err[-2000:])
    assert "Traceback" not in err, (name, err[-2000:])
    assert not os.path.exists(tmp_path / name / "checkpoints" / "0")


# -- resume and checkpoint rows (no training: the checkpoint is an initial state) ----------------
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A workdir with checkpoints at steps 1 and 2 of the tiny MDLM config (bytes tokenizer)."""
  wd = str(tmp_path_factory.mktemp("bad") / "run")
  cfg = tiny_config()
  exp = exp_lib.Experiment.create(cfg)
  state = exp.init_state(cfg.seed)
  ck = ckpt_lib.Checkpointer(wd, async_save=False)
  for step in (1, 2):
    ck.save(step, state, cfg, dict(exp.checkpoint_meta(), step=step))
  ck.wait()
  ck.close()
  return wd


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _train_error(cfg, wd, error=ckpt_lib.CheckpointError):
  before = sorted(os.listdir(ckpt_lib.checkpoint_dir(wd)))
  with pytest.raises(error) as e:
    trainer.train(cfg, wd)
  assert sorted(os.listdir(ckpt_lib.checkpoint_dir(wd))) == before  # nothing saved is lost
  return str(e.value).splitlines()[0]


def test_tokenizer_changed_on_resume(saved_run):
  first = _train_error(tiny_config(data__tokenizer="gpt2"), saved_run)
  assert first.startswith("The checkpoint's tokenizer (bytes"), first
  assert "resume with the tokenizer the run started with" in first


def test_checkpoint_from_another_method(saved_run):
  first = _train_error(tiny_config(method="ar"), saved_run)
  assert first.startswith("The checkpoint was trained with method='mdlm' but config.method='ar'")


@pytest.mark.parametrize("field,value,named", [
    ("model__tie_embeddings", True, "array(s) only in the checkpoint"),
    ("optim__grad_clip", 0.0, "array(s) only in the"),
    ("optim__ema_decay", 0.0, "array(s) only in the checkpoint, e.g. ['ema_params/"),
])
def test_config_change_that_breaks_shapes(saved_run, field, value, named):
  first = _train_error(tiny_config(**{field: value}), saved_run)
  assert first.startswith("The checkpoint of step 2 in ") and "does not fit the current config" \
      in first, first
  assert named in first, first


def test_every_checkpoint_corrupt(saved_run, tmp_path):
  wd = _copy(saved_run, tmp_path / "corrupt")
  for step in (1, 2):
    state_dir = os.path.join(ckpt_lib.checkpoint_dir(wd), str(step), "state")
    for root, _, files in os.walk(state_dir):
      for f in files:
        if not f.endswith("_METADATA"):
          with open(os.path.join(root, f), "wb") as fh:
            fh.write(b"\x00not an array\xff")
  first = _train_error(tiny_config(), wd)
  assert first.startswith("None of the checkpoints [2, 1] in "), first


def test_init_from_a_workdir_without_checkpoints(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    trainer.train(tiny_config(train__init_from=str(empty)), str(tmp_path / "new"))
  assert str(e.value).startswith(f"config.train.init_from='{empty}': {empty} has no checkpoints/")
  assert not (empty / "checkpoints").exists()  # read-only: nothing created in the other run


def test_load_a_folder_that_is_not_a_workdir(tmp_path):
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    api.load(str(tmp_path))
  assert str(e.value).startswith(f"{tmp_path} has no checkpoints/ folder; is it a training")


def test_batch_that_does_not_divide_the_devices(tmp_path):
  with pytest.raises(config_lib.ConfigError) as e:
    trainer.train(tiny_config(train__global_batch_size=12), str(tmp_path / "run"))
  assert str(e.value).startswith("config.train.global_batch_size: 12 is not divisible by the 8 "
                                 "data-parallel devices")


def test_corrupt_array_record_shard(tmp_path):
  from dlm_jax import prepare
  src, data_dir = tmp_path / "owt", tmp_path / "tfds"
  src.mkdir()
  for i in range(12):
    (src / f"doc{i}.txt").write_text(f"Document {i} of a small web corpus. " * 8)
  out = prepare.prepare("openwebtext", data_dir=str(data_dir), source_dir=str(src))
  shard = [f for f in os.listdir(out) if "train.array_record" in f][0]
  with open(os.path.join(out, shard), "r+b") as f:  # damage the first chunk of records
    f.seek(200)
    f.write(b"\x00garbage\xff" * 400)
  cfg = tiny_config(data__source="tfds", data__tfds_name="openwebtext",
                    data__tfds_data_dir=str(data_dir))
  wd = str(tmp_path / "run")
  with pytest.raises(trainer.DataError) as e:
    trainer.train(cfg, wd)
  first = str(e.value).splitlines()[0]
  assert first.startswith("Reading the training data failed (RuntimeError: Corrupted Riegeli"), first
  assert "re-prepare the dataset" in first
  assert not os.path.exists(os.path.join(wd, "checkpoints", "0"))
