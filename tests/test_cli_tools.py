"""One command-line convention for train, sample and evaluate, and what a new user hits first.

sample and evaluate take `--config.sample.<field>=value` overrides typed by the schema, with
train's error style; `--set key=value` still works for one release with a warning. The seed is
config.sample.seed. Commands that only read a run never create or clean anything in its workdir.
Other libraries' info logs are hidden unless --verbosity is given. Every config field a message
or help text names exists in the schema.
"""

import ast
import glob
import json
import logging
import os
import re
import subprocess
import sys
from importlib import metadata

import pytest

from dlm_jax import config as config_lib
from dlm_jax import metrics as metrics_lib
from dlm_jax.run import api
from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax.run import cli
from tests.tiny import TINY_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIBRARY_LINE = re.compile(r"checkpoint_manager\.py|orbax|xla_bridge\.py")


def _run(args, timeout=300):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step tiny run, trained through the command as a user would; returns (workdir, result)."""
  wd = str(tmp_path_factory.mktemp("tools") / "run")
  r = _run(["dlm_jax.train", "--config=configs/mdlm_tiny.py", f"--workdir={wd}",
            *TINY_FLAGS, "--config.train.num_steps=2", "--config.train.print_batch=false"])
  assert r.returncode == 0, r.stderr[-3000:]
  return wd, r


# -- item 8: quiet logs ------------------------------------------------------------------------
def test_train_hides_library_info_logs_and_verbosity_shows_them(trained):
  wd, r = trained
  # Before: 78 stderr lines for a 20-step run, about 75 of them Orbax's. Now only dlm_jax's own.
  assert not [l for l in r.stderr.splitlines() if _LIBRARY_LINE.search(l)], r.stderr[-2000:]
  assert len(r.stderr.splitlines()) <= 3, r.stderr
  assert "eval @ 2" in r.stdout  # the final step is evaluated
  loud = _run(["dlm_jax.evaluate", f"--workdir={wd}", "--num_batches=1", "--num_t=1",
               "--verbosity=0"])
  assert loud.returncode == 0, loud.stderr[-3000:]
  assert len([l for l in loud.stderr.splitlines() if _LIBRARY_LINE.search(l)]) >= 5


# -- items 7 and 8: the sample command --------------------------------------------------------
def _samples(out_dir):
  toks = [json.loads(l)["tokens"] for l in open(os.path.join(out_dir, "samples.jsonl"))]
  return toks, json.load(open(os.path.join(out_dir, "samples_summary.json")))


def test_sample_overrides_in_train_syntax_and_the_seed_is_honoured(trained, tmp_path):
  wd, _ = trained
  common = [f"--workdir={wd}", "--num_samples=2"]
  new = _run(["dlm_jax.sample", *common, f"--out_dir={tmp_path / 'a'}",
              "--config.sample.num_steps=4", "--config.sample.batch_size=2",
              "--config.sample.use_cache=false", "--config.sample.seed=5"])
  assert new.returncode == 0, new.stderr[-3000:]
  assert not [l for l in new.stderr.splitlines() if _LIBRARY_LINE.search(l)], new.stderr[-2000:]
  toks_a, summ_a = _samples(tmp_path / "a")
  assert summ_a["num_steps"] == 4 and summ_a["seed"] == 5
  flag = _run(["dlm_jax.sample", *common, f"--out_dir={tmp_path / 'b'}", "--seed=5",
               "--config.sample.num_steps=4", "--config.sample.batch_size=2",
               "--config.sample.use_cache=false"])
  assert flag.returncode == 0, flag.stderr[-3000:]
  old = _run(["dlm_jax.sample", *common, f"--out_dir={tmp_path / 'c'}", "--set", "seed=6",
              "--set", "num_steps=4", "--set", "batch_size=2", "--set", "use_cache=False"])
  assert old.returncode == 0, old.stderr[-3000:]
  assert "--set is deprecated" in old.stderr and "--config.sample.seed=6" in old.stderr
  toks_b, summ_b = _samples(tmp_path / "b")
  toks_c, summ_c = _samples(tmp_path / "c")
  assert summ_b["seed"] == 5 and summ_c["seed"] == 6 and summ_c["num_steps"] == 4
  assert toks_a == toks_b      # config.sample.seed=5 is --seed=5
  assert toks_a != toks_c      # and --set seed=6 is not ignored


@pytest.mark.parametrize("args,first_line", [
    (["dlm_jax.sample", "--config.sample.use_cache=ture"],
     "ERROR: flag --config.sample.use_cache=ture: ('Non-boolean argument to boolean flag', 'ture')"),
    (["dlm_jax.sample", "--config.sample.tua=0.9"],
     "ERROR: Unknown config field(s): config.sample.tua."),
    (["dlm_jax.evaluate", "--config.model.d_model=8"],
     "ERROR: evaluate takes config.sample.* overrides only; config.model.d_model is the run's"),
    (["dlm_jax.sample", "--set", "use_cache=ture"],
     "ERROR: --set use_cache='ture': expected a boolean (true or false)."),
    (["dlm_jax.sample", "--seed=5", "--config.sample.seed=6"],
     "ERROR: --seed=5 and --config.sample.seed=6 disagree; give one of them."),
])
def test_bad_overrides_are_named(trained, tmp_path, args, first_line):
  wd, _ = trained
  r = _run([*args, f"--workdir={wd}", f"--out_dir={tmp_path}"])
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("ERROR:")]
  assert errors and errors[0].startswith(first_line), r.stderr[-2000:]
  assert not os.path.exists(tmp_path / "samples.jsonl")


def test_set_booleans_are_strict_and_deprecated(caplog):
  with caplog.at_level(logging.WARNING):
    got = cli.parse_sample_overrides(["use_cache=FALSE", "tau=0.5", "num_steps=3"])
  assert got == {"use_cache": False, "tau": 0.5, "num_steps": 3}
  assert "--set is deprecated" in caplog.text and "--config.sample.tau=0.5" in caplog.text
  assert cli.parse_sample_overrides(["use_cache=1"]) == {"use_cache": True}
  for bad in ("use_cache=ture", "use_cache=", "use_cache=on!"):
    with pytest.raises(config_lib.ConfigError, match="expected a boolean"):
      cli.parse_sample_overrides([bad])
  with pytest.raises(config_lib.ConfigError, match="unknown sample option"):
    cli.parse_sample_overrides(["tua=0.9"])
  assert cli.unknown_overrides(["--config.sample.tau=1", "--noconfig.sample.use_cahe",
                                "--config.sampel.tau=2"]) == ["sample.use_cahe", "sampel.tau"]


# -- item 8: read-only commands leave the workdir alone ---------------------------------------
def test_sample_with_a_mistyped_workdir_creates_nothing(tmp_path):
  typo = tmp_path / "runn"
  r = _run(["dlm_jax.sample", f"--workdir={typo}", "--num_samples=1"])
  assert r.returncode == 2
  assert f"ERROR: {typo} has no checkpoints/ folder; is it a training --workdir?" in r.stderr
  assert not typo.exists()
  for read in (api.load, api.read_run_config):
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoints/ folder"):
      read(str(typo))
    assert not typo.exists()


def test_read_only_open_cleans_nothing_and_cannot_save(trained):
  wd, _ = trained
  # An in-progress save of a training run that is still going: a reader must not remove it
  # (the writable manager's start-up clean-up would).
  pending = os.path.join(ckpt_lib.checkpoint_dir(wd), "4.orbax-checkpoint-tmp-123")
  os.makedirs(os.path.join(pending, "state"))
  try:
    run = api.load(wd)
    assert run.step == 2 and os.path.isdir(pending)
    ro = ckpt_lib.Checkpointer(wd, read_only=True)
    with pytest.raises(ckpt_lib.CheckpointError, match="read-only"):
      ro.save(3, None, run.config, {})
    ro.close()
    assert os.path.isdir(pending)
  finally:
    os.rmdir(os.path.join(pending, "state"))
    os.rmdir(pending)


# -- item 8: install metadata -----------------------------------------------------------------
def _setup_call() -> dict:
  tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
  call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
  return {k.arg: k.value for k in call.keywords}


def _floor(spec: str) -> tuple[int, ...]:
  m = re.search(r">=\s*(\d+(?:\.\d+)*)", spec or "")
  return tuple(int(x) for x in m.group(1).split(".")) if m else (0,)


def test_python_requires_covers_the_pinned_stack():
  ours = _floor(ast.literal_eval(_setup_call()["python_requires"]))
  for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"):
    theirs = _floor(metadata.metadata(dist).get("Requires-Python"))
    assert ours >= theirs[:2], f"{dist} needs Python {theirs}, setup.py says {ours}"


def test_matplotlib_is_an_extra_and_only_metrics_pyplot_imports_it(monkeypatch):
  src = open(os.path.join(ROOT, "setup.py")).read()
  core = src[src.index("CORE = ["):src.index("]", src.index("CORE = ["))]
  assert "matplotlib" not in core
  assert re.search(r'"plots":\s*PLOTS', src) and 'PLOTS = ["matplotlib' in src
  importers = []
  for path in glob.glob(os.path.join(ROOT, "dlm_jax", "**", "*.py"), recursive=True) + glob.glob(
      os.path.join(ROOT, "benchmarks", "*.py")):
    for node in ast.walk(ast.parse(open(path).read())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      if any(n.split(".")[0] == "matplotlib" for n in names):
        importers.append(os.path.relpath(path, ROOT))
  assert sorted(set(importers)) == ["dlm_jax/metrics.py"]
  # Without matplotlib the plotting code names the extra to install.
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  with pytest.raises(metrics_lib.MissingExtraError, match=r"pip install 'dlm-jax\[plots\]'"):
    metrics_lib.pyplot()
  from dlm_jax.evaluation import task_accuracy  # pylint: disable=g-import-not-at-top
  with pytest.raises(metrics_lib.MissingExtraError, match="plots"):
    task_accuracy.plot_curves({"a": [dict(tpf_content=1.0, accuracy=1.0, setting="x")]},
                              os.devnull)


# -- item 8: messages and help texts name real fields -----------------------------------------
_FIELD = re.compile(r"(?<![\w.])config\.([a-z_]+)\.([a-z_0-9]+)")


def _unknown_fields(text: str) -> set[str]:
  known = config_lib.field_names()
  return {f"{a}.{b}" for a, b in _FIELD.findall(text)} - known


def test_every_config_field_named_in_the_code_exists():
  files = (glob.glob(os.path.join(ROOT, "dlm_jax", "**", "*.py"), recursive=True)
           + glob.glob(os.path.join(ROOT, "configs", "*.py"))
           + glob.glob(os.path.join(ROOT, "launch", "*")))
  bad = {os.path.relpath(p, ROOT): _unknown_fields(open(p).read())
         for p in files if os.path.isfile(p)}
  assert {p: f for p, f in bad.items() if f} == {}


def test_prepare_help_and_missing_data_errors_name_real_fields(tmp_path):
  r = _run(["dlm_jax.prepare", "--help"])  # absl's --help exits with status 1
  assert "config.data.tfds_data_dir" in r.stdout and "--dataset" in r.stdout, r.stdout[-2000:]
  assert _unknown_fields(r.stdout) == set()
  # The real errors a missing corpus raises (text file, TFDS dataset not prepared, bad batch).
  from dlm_jax.data import corpora, pipeline, sources  # pylint: disable=g-import-not-at-top
  from dlm_jax.data.tokenizers import ByteTokenizer  # pylint: disable=g-import-not-at-top
  from tests.tiny import tiny_config  # pylint: disable=g-import-not-at-top
  messages = []
  for check in (lambda: sources.get("text").check(tiny_config(data__source="text",
                                                               data__path="/no/such.txt")),
                lambda: corpora.tfds_source("openwebtext", "train", str(tmp_path)),
                lambda: pipeline._check_args(None, ByteTokenizer(), 8, 3, 0, 2, "pack")):  # pylint: disable=protected-access
    with pytest.raises(Exception) as e:
      check()
    messages.append(str(e.value))
  assert all("config." in m for m in messages), messages
  assert [_unknown_fields(m) for m in messages] == [set()] * 3, messages
