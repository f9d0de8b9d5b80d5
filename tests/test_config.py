"""Config validation: every bad value stops the run before compute, naming the field."""

import ml_collections
import pytest

from dlm_jax import config_lib
from dlm_jax import experiment as exp_lib
from tests.tiny import tiny_config


def _raises(cfg, field, **kw):
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    config_lib.validate(cfg, **kw)


def test_valid_configs_pass():
  from configs import mdlm_owt, mdlm_tiny
  for mod in (mdlm_tiny, mdlm_owt):
    config_lib.validate(mod.get_config(), num_data_parallel=8)


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
