"""Fast decoding end to end: scheduled sampling through the real CLI, its bad-input errors,
all-heavy == single-model sampling, FLOPs accounting, and the step-importance analysis."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from dlm_jax.run import api
from dlm_jax import config as config_lib
from dlm_jax import sample as sample_cli
from dlm_jax.run import trainer
from dlm_jax import metrics as metrics_lib
from dlm_jax.scheduling import step_importance as si
from dlm_jax.scheduling import schedule as ms
from dlm_jax.scheduling import flops as flops_lib
from dlm_jax.scheduling import sampler as scheduled
from tests.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Tiny heavy (2 blocks) and light (1 block) MDLMs on the same data, plus an AR run."""
  root = tmp_path_factory.mktemp("sched")
  out = {}
  for name, over in (("heavy", {}), ("light", dict(model__num_layers=1)),
                     ("ar", dict(method="ar"))):
    cfg = tiny_config(train__num_steps=2, train__ckpt_every=2, **over)
    wd = str(root / name)
    trainer.train(cfg, wd)
    out[name] = wd
  return out


@pytest.fixture(scope="module")
def loaded(runs):
  """The heavy and light runs restored once for the in-process tests."""
  return api.load(runs["heavy"]), api.load(runs["light"])


def _cli(args, timeout=240):
  return subprocess.run([sys.executable, "-m", "dlm_jax.sample", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def test_scheduled_cli_writes_flops_summary(runs, tmp_path):
  out = str(tmp_path / "s")
  r = _cli([f"--workdir={runs['heavy']}", f"--light_workdir={runs['light']}",
            "--schedule=L2,H4,L2", "--num_samples=3", "--set", "batch_size=2",
            "--set", "use_cache=false", f"--out_dir={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  summ = json.load(open(os.path.join(out, "samples_summary.json")))
  assert summ["schedule"] == "L2,H4,L2" and summ["num_steps"] == 8
  assert summ["num_light_steps"] == 4 and summ["num_samples"] == 3
  # No cache: every step runs a pass (a sample still has masks until its last step, or earlier).
  assert 0 < summ["mean_nfe_light"] <= 4 and 0 < summ["mean_nfe_heavy"] <= 4
  assert summ["mean_nfe"] == pytest.approx(summ["mean_nfe_heavy"] + summ["mean_nfe_light"])
  f_b = summ["flops"]["blocks"]
  # Nominal "blocks" saving: 4 light steps of 8, light = half the blocks of heavy (same d, L).
  assert f_b["saving_nominal"] == pytest.approx(0.5 * 0.5, rel=1e-9)
  assert f_b["per_pass_light"] == pytest.approx(0.5 * f_b["per_pass_heavy"])
  assert summ["flops"]["full"]["saving_nominal"] < f_b["saving_nominal"]
  assert summ["wall_sec_per_sample"] > 0
  recs = [json.loads(l) for l in open(os.path.join(out, "samples.jsonl"))]
  assert len(recs) == 3 and all(len(x["tokens"]) == 32 for x in recs)


def test_cli_refuses_method_mismatch_and_bad_schedule(runs, tmp_path):
  r = _cli([f"--workdir={runs['heavy']}", f"--light_workdir={runs['ar']}", "--schedule=L4,H4",
            f"--out_dir={tmp_path}"])
  assert r.returncode == 2 and "method" in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(tmp_path / "samples.jsonl")
  r = _cli([f"--workdir={runs['heavy']}", f"--light_workdir={runs['light']}",
            "--schedule=L4,H8", "--set", "num_steps=8", f"--out_dir={tmp_path}"])
  assert r.returncode == 2 and "outside" in r.stderr and "11" in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(tmp_path / "samples.jsonl")


def test_bad_inputs_raise_before_sampling(runs, tmp_path, monkeypatch):
  def boom(*a, **k):
    raise AssertionError("sampling must not start")
  monkeypatch.setattr(scheduled, "sample_batches", boom)
  monkeypatch.setattr(api, "sample_batches", boom)
  with pytest.raises(scheduled.ScheduleError, match="outside"):
    sample_cli.run_scheduled_sampling(runs["heavy"], runs["light"], "L4,H4,L4",
                                      {"num_steps": 8}, 2, 0, str(tmp_path))
  with pytest.raises(scheduled.ScheduleError, match="covers only"):
    sample_cli.run_scheduled_sampling(runs["heavy"], runs["light"], "L2,H2",
                                      {"num_steps": 8}, 2, 0, str(tmp_path))
  with pytest.raises(scheduled.ScheduleError, match="H750 or L125"):
    sample_cli.run_scheduled_sampling(runs["heavy"], runs["light"], "L2,X4", {}, 2, 0,
                                      str(tmp_path))
  with pytest.raises(scheduled.ScheduleError, match="method"):
    sample_cli.run_scheduled_sampling(runs["heavy"], runs["ar"], "L4,H4", {}, 2, 0,
                                      str(tmp_path))
  for tau in (0.0, 1.5, -0.1):
    with pytest.raises(config_lib.ConfigError, match="tau"):
      sample_cli.run_sampling(runs["heavy"], {"decoder": "threshold", "tau": tau}, 2, 0,
                              str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match="r2"):
    sample_cli.run_sampling(runs["heavy"], {"decoder": "threshold", "r2": "conf,bogus"}, 2, 0,
                            str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match="threshold"):
    sample_cli.run_sampling(runs["heavy"], {"decoder": "ancestral", "r2": "conf"}, 2, 0,
                            str(tmp_path))
  assert not os.path.exists(tmp_path / "samples.jsonl")


def test_tokenizer_mismatch_is_refused():
  a = tiny_config()
  b = tiny_config(data__tokenizer="bpe")
  with pytest.raises(scheduled.ScheduleError, match="tokenizer"):
    scheduled.check_pair_configs(a, b)
  c = tiny_config(data__source="hmm", data__seq_len=33)
  with pytest.raises(scheduled.ScheduleError, match="tokenizer"):
    scheduled.check_pair_configs(a, c)
  scheduled.check_pair_configs(a, tiny_config(model__num_layers=1))  # same data: fine

  class Tok:
    def __init__(self, fp, v):
      self.fp, self.vocab_size = fp, v
      self.bos_id, self.eos_id, self.mask_id, self.pad_id = 1, 2, 3, 0

    def fingerprint(self):
      return self.fp
  with pytest.raises(scheduled.ScheduleError, match="different tokenizers"):
    scheduled.check_pair_tokenizers(Tok("a", 10), Tok("b", 10))
  scheduled.check_pair_tokenizers(Tok("a", 10), Tok("a", 10))


def test_all_heavy_schedule_equals_single_model_sampler(loaded):
  heavy, light = loaded
  with jax.enable_x64(True):
    single = heavy.sample(num_samples=4, seed=3, decoder="ancestral", num_steps=8)
    s = ml_collections.ConfigDict(heavy.config.sample.to_dict())
    s.num_samples, s.batch_size, s.num_steps, s.decoder = 4, 4, 8, "ancestral"
    allh = scheduled.sample_batches(heavy, light, s, ms.parse_schedule("H8"), seed=3)
    mixed = scheduled.sample_batches(heavy, light, s, ms.parse_schedule("L4,H4"), seed=3)
    tok = heavy.tokenizer
    banned = (tok.bos_id, tok.eos_id)
    sup = scheduled.ScheduledSampler(heavy.method, light.method, suppress_ids=banned)
    restricted = scheduled.sample_batches(heavy, light, s, ms.parse_schedule("L4,H4"), seed=3,
                                          sampler=sup)
  gen = restricted["tokens"][:, 1:]
  assert not np.isin(gen, banned).any() and not (gen == tok.mask_id).any()
  np.testing.assert_array_equal(allh["tokens"], single["tokens"])
  np.testing.assert_array_equal(allh["nfe"], single["nfe"])
  assert np.all(allh["nfe_light"] == 0)
  assert np.all(mixed["nfe_light"] > 0) and np.all(mixed["nfe_heavy"] > 0)


def test_step_importance_on_tiny_models(loaded):
  heavy, light = loaded
  fh, fl = heavy.method.logits_fn(heavy.params), light.method.logits_fn(light.params)
  mask_id = heavy.tokenizer.mask_id
  rng = np.random.default_rng(0)
  x0 = rng.integers(32, 120, size=(6, 32)).astype(np.int32)
  maskable = np.ones_like(x0, bool)
  maskable[:, 0] = False
  t_grid = [0.1, 0.5, 0.9]
  key = jax.random.key(0)
  curves = si.time_curves(fh, fl, x0, t_grid, key, mask_id, maskable)
  for k in ("ce_heavy", "ce_light", "kl", "delta_ce"):
    assert curves[k].shape == (3,) and np.all(np.isfinite(curves[k])), k
  assert np.all(curves["kl"] >= 0)
  # Nested masks: more slots masked at larger t.
  assert curves["masked"][0] < curves["masked"][1] < curves["masked"][2]
  np.testing.assert_allclose(si.masked_ce_curve(fh, x0, t_grid, key, mask_id, maskable),
                             curves["ce_heavy"], rtol=1e-6)
  np.testing.assert_allclose(si.kl_curve(fh, fl, x0, t_grid, key, mask_id, maskable),
                             curves["kl"], rtol=1e-6)
  # A model against itself: zero KL and zero Delta_CE.
  np.testing.assert_allclose(si.kl_curve(fh, fh, x0, t_grid, key, mask_id, maskable), 0,
                             atol=1e-6)
  x_init = np.where(maskable, mask_id, x0).astype(np.int32)
  traj = si.trajectory_kl(fh, fl, key, x_init, maskable, mask_id, 8)
  assert traj.shape == (8,) and np.all(traj >= 0)
  np.testing.assert_allclose(si.trajectory_kl(fh, fh, key, x_init, maskable, mask_id, 8), 0,
                             atol=1e-6)


def _constant_model(p, mask_id=2):
  """Logits [B, L, 3] that ignore the tokens: SUBS probabilities p over ids 0, 1 (MASK = 2)."""
  row = np.log(np.array(list(p) + [1.0], np.float64)).astype(np.float32)
  row[mask_id] = 5.0  # ignored by SUBS
  return lambda tokens: jax.numpy.broadcast_to(jax.numpy.asarray(row), tokens.shape + (3,))


def test_step_importance_curves_by_hand():
  """Constant models p_H = (0.5, 0.5), p_L = (0.9, 0.1) on data that is all id 1:
  KL(p_H || p_L) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5108256 (the reverse direction,
  KL(p_L || p_H), would be 0.3680642); CE_H = ln 2, CE_L = ln 10, Delta_CE = ln 5."""
  heavy, light = _constant_model((0.5, 0.5)), _constant_model((0.9, 0.1))
  kl_hl = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
  assert kl_hl == pytest.approx(0.5108256, abs=1e-7)
  x0 = np.ones((64, 16), np.int32)
  maskable = np.ones_like(x0, bool)
  maskable[:, :2] = False
  t_grid = [0.2, 0.5, 1.0]
  key = jax.random.key(1)
  c = si.time_curves(heavy, light, x0, t_grid, key, 2, maskable)
  np.testing.assert_allclose(c["kl"], kl_hl, rtol=1e-5)
  np.testing.assert_allclose(c["ce_heavy"], np.log(2.0), rtol=1e-5)
  np.testing.assert_allclose(c["ce_light"], np.log(10.0), rtol=1e-5)
  np.testing.assert_allclose(c["delta_ce"], np.log(5.0), rtol=1e-5)
  np.testing.assert_allclose(si.kl_curve(heavy, light, x0, t_grid, key, 2, maskable), kl_hl,
                             rtol=1e-5)
  np.testing.assert_allclose(si.delta_ce_curve(heavy, light, x0, t_grid, key, 2, maskable),
                             np.log(5.0), rtol=1e-5)
  # Masked slots: Binomial(896, 1 - alpha(t) = t) at each t, every maskable slot at t = 1.
  n = maskable.sum()
  assert c["masked"][2] == n
  for j, t in enumerate(t_grid[:2]):
    assert abs(c["masked"][j] - n * t) < 5 * np.sqrt(n * t * (1 - t)), (t, c["masked"][j])
  # On the heavy sampler's trajectory: the same KL at every step, in both averaging modes.
  x_init = np.where(maskable, 2, x0).astype(np.int32)
  for over in ("revealed", "masked"):
    traj = si.trajectory_kl(heavy, light, key, x_init, maskable, 2, 6, over=over)
    np.testing.assert_allclose(traj, kl_hl, rtol=1e-5)


def test_predicted_degradation_oracle():
  # Curve over t linear: c(t) = t. T = 4 steps, midpoints 0.875, 0.625, 0.375, 0.125.
  t_grid = np.linspace(0.05, 0.95, 19)
  sched = ms.parse_schedule("L1,H2,L1")
  assert si.predicted_degradation(sched, t_grid, t_grid) == pytest.approx(0.875 + 0.125)
  assert si.predicted_degradation(sched.expand(), np.ones(19), t_grid) == pytest.approx(2.0)
  # Beyond the grid the curve is held constant (0.95 at t = 0.975).
  assert si.predicted_degradation([True], t_grid, t_grid) == pytest.approx(0.5)
  per_step = np.array([1.0, 2.0, 4.0, 8.0])
  assert si.predicted_degradation(sched, per_step) == pytest.approx(9.0)
  with pytest.raises(ValueError, match="per-step"):
    si.predicted_degradation(sched, np.ones(5))
  # The search ranks placements by the curve: with c(t) = t the light steps go to the clean end.
  recs = si.search_placements(lambda s: si.predicted_degradation(s, t_grid, t_grid), 4, 2, 1)
  assert [r["light_segments"] for r in recs] == [(3,), (2,), (1,), (0,)]
  assert recs[0]["schedule"] == "H6,L2" and recs[0]["rank"] == 1
  assert len(si.search_placements(lambda s: 0.0, 4, 1)) == 16
  assert metrics_lib.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert metrics_lib.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_flops_report_toy_pair():
  # Spec toy pair: H 4 blocks, L 1 block, d 64, seq 32, V 17; 25% light steps.
  h = dict(n_layers=4, d=64, seq_len=32, vocab=17)
  l = dict(n_layers=1, d=64, seq_len=32, vocab=17)
  sched = ms.ModelSchedule.from_placement((0, 7), 8, 4)
  rep = flops_lib.flops_report(sched, h, l, np.array([24, 24]), np.array([8, 8]),
                               nfe_all_heavy=32)
  assert rep["blocks"]["saving_nominal"] == pytest.approx(0.1875)
  assert rep["full"]["saving_nominal"] == pytest.approx(0.1865, abs=5e-4)
  assert rep["blocks"]["saving_nfe"] == pytest.approx(0.1875)
  assert rep["blocks"]["saving_vs_all_heavy_nfe"] == pytest.approx(0.1875)
  # Fewer passes than nominal (cache hits) count only what ran.
  rep2 = flops_lib.flops_report(sched, h, l, np.array([12]), np.array([4]), nfe_all_heavy=20)
  assert rep2["blocks"]["nfe_per_sample"] == pytest.approx(
      12 * rep2["blocks"]["per_pass_heavy"] + 4 * rep2["blocks"]["per_pass_light"])
  assert rep2["blocks"]["saving_vs_all_heavy_nfe"] == pytest.approx(1 - (12 + 4 * 0.25) / 20)
