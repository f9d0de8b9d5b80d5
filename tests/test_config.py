"""Config validation: every bad value stops the run before compute, naming the field."""

import importlib
import json
import os

import ml_collections
import pytest

from dlm_jax import config as config_lib
from dlm_jax.run import experiment as exp_lib
from tests.tiny import tiny_config


def _raises(cfg, field, **kw):
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    exp_lib.validate_config(cfg, **kw)


def _recipes():
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  return sorted(f[:-3] for f in os.listdir(root)
                if f.endswith(".py") and f not in ("__init__.py", "base.py", "toy_base.py"))  # bases


@pytest.mark.parametrize("name", _recipes())
def test_every_recipe_is_valid(name, tmp_path):
  """Every configs/*.py passes the start-up check (with its data file present), resolves its
  decoder to one of its method's family, and survives the JSON round trip of a checkpoint."""
  from dlm_jax import methods  # pylint: disable=g-import-not-at-top
  from dlm_jax.sampling import decoders  # pylint: disable=g-import-not-at-top
  cfg = importlib.import_module(f"configs.{name}").get_config()
  if cfg.data.path:  # SFT recipes point at a scored set made by score_difficulty
    cfg.data.path = str(tmp_path / os.path.basename(cfg.data.path))
    open(cfg.data.path, "w").close()
  exp_lib.validate_config(cfg, num_data_parallel=8)
  method = methods.get_method_class(cfg.method)
  assert decoders.get(cfg.sample.decoder).family == method.family
  again = config_lib.from_saved(json.loads(cfg.to_json_best_effort()))
  assert again.to_dict() == cfg.to_dict()
  cfg.optim.lr = -1.0  # and one bad value still stops it
  _raises(cfg, "config.optim.lr")


def test_unknown_field_is_named():
  cfg = tiny_config()
  cfg.model.widht = 3
  _raises(cfg, "config.model.widht")


def test_wrong_type_is_named():
  d = tiny_config().to_dict()
  d["optim"]["lr"] = "fast"  # a config file written by hand can hold any type
  _raises(ml_collections.ConfigDict(d), "config.optim.lr")


@pytest.mark.parametrize("field,value,kw,msg", [
    ("train.global_batch_size", 12, dict(num_data_parallel=8), "train.global_batch_size"),
    ("data.seq_len", 100, {}, "data.seq_len"),
    ("data.tokenizer", "file:/nonexistent/tokenizer.json", {}, "data.tokenizer"),
    ("method", "gpt", {}, "config.method"),
    ("model.num_heads", 3, {}, "model.num_heads"),
    ("sample.tau", 1.5, {}, "sample.tau"),
    ("data.source", "text", {}, "data.path"),
    ("model.attention", "flash", {}, "model.attention"),
])
def test_impossible_values_are_named(field, value, kw, msg):
  cfg = tiny_config()
  node = cfg
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  _raises(cfg, msg, **kw)


def test_mesh_that_does_not_fit_devices():
  cfg = tiny_config()
  cfg.mesh.data, cfg.mesh.fsdp = 3, 1
  with pytest.raises(ValueError, match="config.mesh"):
    exp_lib.Experiment.create(cfg)
