"""One registry per plug-in kind, the start-up checks they drive, the config aliases, and the
concepts that had two homes before (one version each now, disagreements resolved on purpose)."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import config as config_lib
from dlm_jax import methods
from dlm_jax import metrics
from dlm_jax.data import sources
from dlm_jax.models import attention
from dlm_jax.run import api
from dlm_jax.run import experiment as exp_lib
from dlm_jax.run import trainer
from dlm_jax.sampling import decoders
from tests.tiny import tiny_config


# -- registries ---------------------------------------------------------------------------------
def test_each_registry_names_its_plugins_and_refuses_others():
  assert set(methods.names()) == {"mdlm", "did", "ar"}
  assert set(decoders.names()) == {"ancestral", "threshold", "fixed_k", "did", "autoregressive"}
  assert set(decoders.names("masked")) == {"ancestral", "threshold", "fixed_k"}
  assert set(sources.names()) == {"bible", "text", "tfds", "arith", "hmm", "hmm_varlen", "sft"}
  assert set(attention.names()) == {"xla", "pallas", "splash", "cudnn", "auto"}
  for field, value, registry in (("method", "gpt", "methods"), ("data.source", "wiki", "sources"),
                                 ("sample.decoder", "beam", "decoders"),
                                 ("model.attention", "flash", "attention")):
    cfg = tiny_config()
    config_lib._set_field(cfg, field, value)  # pylint: disable=protected-access
    with pytest.raises(config_lib.ConfigError, match=rf"config\.{field}='?{value}'? is not"):
      exp_lib.validate_config(cfg)
    del registry


@pytest.mark.parametrize("method,decoder", [("mdlm", "did"), ("mdlm", "autoregressive"),
                                            ("ar", "ancestral"), ("did", "threshold")])
def test_a_decoder_that_does_not_fit_the_method_is_a_config_error(method, decoder):
  cfg = tiny_config(method=method, sample__decoder=decoder)
  if method == "did":
    cfg.model.time_conditioning = True
  with pytest.raises(config_lib.ConfigError, match=rf"sample.decoder='{decoder}'.*does not fit"):
    exp_lib.validate_config(cfg)


def test_empty_decoder_is_the_methods_default():
  for method, want in (("mdlm", "ancestral"), ("ar", "autoregressive"), ("did", "did")):
    cfg = tiny_config(method=method, sample__decoder="", model__time_conditioning=method == "did")
    exp_lib.validate_config(cfg)
    assert cfg.sample.decoder == want


def test_a_new_decoder_is_one_registration():
  """A decoder registered from outside the package is accepted for its family, at start-up and in
  the library, with nothing else changed."""

  def greedy(method, params, key, s, prompt=None):
    del key
    prompt = decoders.default_prompt(method, s.batch_size, prompt)
    logits = method.logits_fn(params)(prompt)
    return dict(tokens=jnp.argmax(logits, -1).astype(jnp.int32), nfe=jnp.ones(prompt.shape[:1]),
                prompt_len=prompt.shape[1], gen_len=0)

  dec = decoders.register(decoders.Decoder("greedy_test", "masked", greedy))
  try:
    cfg = tiny_config(sample__decoder="greedy_test")
    exp = exp_lib.Experiment.create(cfg)
    params = exp.init_state(0).params
    out = exp.method.sample(params, jax.random.key(0), cfg.sample)
    assert out["tokens"].shape == (cfg.sample.batch_size, 1)
    with pytest.raises(config_lib.ConfigError, match="does not fit"):
      exp_lib.validate_config(tiny_config(method="ar", sample__decoder="greedy_test"))
  finally:
    del decoders.REGISTRY[dec.name]


@pytest.fixture(scope="module")
def mdlm_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("reg") / "run")
  trainer.train(tiny_config(train__num_steps=2, train__ckpt_every=2), wd)
  return api.load(wd)


@pytest.mark.parametrize("overrides,match", [
    (dict(decoder="did"), "does not fit"),
    (dict(decoder="threshold", tau=1.5), r"sample.tau=1.5 is outside \(0, 1\]"),
    (dict(decoder="ancestral", r2="conf"), "needs sample.decoder=threshold"),
    (dict(decoder="threshold", r2="conf,bogus"), "sample.r2"),
    (dict(decoder="threshold", gen_len=12), "multiple of sample.block_len"),
    (dict(decoder="ancestral", t_final=1.0), "sample.t_final"),
])
def test_the_library_refuses_what_the_command_refuses(mdlm_run, overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    mdlm_run.sample(num_samples=1, **overrides)
  s = mdlm_run.config.sample
  bad = type(s)(s.to_dict())
  for k, v in overrides.items():
    bad[k] = v
  with pytest.raises(config_lib.ConfigError, match=match):  # the method itself checks too
    mdlm_run.method.sample(mdlm_run.params, jax.random.key(0), bad)


# -- config aliases ------------------------------------------------------------------------------
def test_moved_fields_keep_their_old_names_with_a_warning(caplog):
  cfg = tiny_config(method="did", model__time_conditioning=False, sample__decoder="did")
  cfg.diffusion.did_variant = "fixed"          # old name
  cfg.diffusion.did_pack = False
  cfg.diffusion.sft_weighting = "uniform"
  with caplog.at_level(logging.WARNING):
    exp_lib.validate_config(cfg)
  assert cfg.did.variant == "fixed" and cfg.did.pack is False and cfg.trims.weighting == "uniform"
  assert cfg.diffusion.did_variant is None     # moved, not duplicated
  assert "config.diffusion.did_variant is deprecated" in caplog.text
  assert "use config.did.variant" in caplog.text
  with pytest.raises(TypeError, match="did_pack"):  # the old names keep their types
    tiny_config().diffusion.did_pack = "no"


def test_a_checkpoint_config_from_before_the_move_loads():
  old = json.loads(tiny_config().to_json_best_effort())
  for k in ("did", "trims"):
    del old[k]
  old["diffusion"].update(did_variant="fixed", did_pack_len=160, masking="trims",
                          trims_buckets=4, sft_weighting="uniform")
  old["sample"]["decoder"] = "ancestral"
  cfg = config_lib.from_saved(old)
  assert (cfg.did.variant, cfg.did.pack_len, cfg.trims.masking, cfg.trims.num_buckets,
          cfg.trims.weighting) == ("fixed", 160, "trims", 4, "uniform")
  assert cfg.diffusion.masking is None and isinstance(cfg.did.max_log_count, float)


# -- concepts that had two homes -----------------------------------------------------------------
def test_spearman_and_wilson_have_one_definition():
  assert metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  assert metrics.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486833, abs=1e-6)
  # Constant input: undefined, NaN (it read 0.0 in one copy and NaN in the other before).
  assert np.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))
  assert np.isnan(metrics.spearman([1], [2]))
  with pytest.raises(ValueError, match="equal length"):
    metrics.spearman([1, 2], [1, 2, 3])
  assert all(np.isnan(metrics.wilson_interval(0, 0)))  # no trials: no interval (one copy raised)


def test_the_sampler_reads_the_same_alpha_as_the_loss():
  """One alpha(t): the ancestral decoder takes the method's schedule object (it used to rebuild
  alpha from the schedule's name, dropping eps). For the log-linear and cosine schedules the
  reveal probability (alpha_s - alpha_t) / (1 - alpha_t) does not depend on eps, so that copy drew
  the same samples (the before/after fingerprint agrees); here the formula is checked with eps."""
  from dlm_jax.sampling import ancestral  # pylint: disable=g-import-not-at-top
  exp = exp_lib.Experiment.create(tiny_config(diffusion__eps=0.2))
  sched = exp.method.schedule
  t, s = 0.75, 0.5
  logp = jnp.log(jnp.asarray([0.6, 0.4, 0.0]))  # id 2 stands for the mask here
  w = np.exp(np.asarray(ancestral.ancestral_step_log_weights(logp, t, s, 2, sched)))
  a_t, a_s = 1 - 0.8 * t, 1 - 0.8 * s
  np.testing.assert_allclose(w, [0.6 * (a_s - a_t) / (1 - a_t), 0.4 * (a_s - a_t) / (1 - a_t),
                                 (1 - a_s) / (1 - a_t)], rtol=1e-6)
  assert float(sched.weight(0.5)) == pytest.approx(2.0)  # the loss's 1/t for every eps


def test_one_flops_formula():
  from dlm_jax.models.flops import forward_flops, forward_flops_per_token  # pylint: disable=g-import-not-at-top
  from dlm_jax.scheduling import flops  # pylint: disable=g-import-not-at-top
  exp = exp_lib.Experiment.create(tiny_config())
  cfg = exp.method.model_cfg
  per_token = forward_flops_per_token(cfg, 32)
  fcfg = flops.flops_model_config(exp.config, cfg.vocab_size, 32)
  assert flops.model_forward_flops(fcfg, "full") == pytest.approx(32 * per_token)
  d, n_layers, v = 32, 2, cfg.vocab_size  # spec/decoding.md: L (n (24 d^2 + 4 L d) + 2 d V)
  assert forward_flops(n_layers, d, 32, v, 4, "full") == 32 * (n_layers * (24 * d * d + 4 * 32 * d)
                                                                + 2 * d * v)
