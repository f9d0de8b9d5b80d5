"""The DID HMM-16 toy's pieces (issue 16): the variable-length HMM source, exact-evaluator helpers, seed
intervals, the count head's calibration helper, and the sampler's length law against the real sampler."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import config as config_lib
from dlm_jax import metrics
from dlm_jax.data import sources
from dlm_jax.data.tasks import hmm as hmm_task
from dlm_jax.evaluation import exact
from dlm_jax.methods.did import lengths as did_lengths
from dlm_jax.methods.did.sampler import did_sample
from dlm_jax.run import experiment as exp_lib
from tests.tiny import tiny_config

PAD, BOS = hmm_task.HMM_PAD, hmm_task.HMM_BOS


# -- the hmm_varlen data source ------------------------------------------------------------------
def _varlen_config(pad_as_token, **kw):
  kw = dict(dict(data__source="hmm_varlen", data__seq_len=33, data__min_len=8), **kw)
  return tiny_config(data__pad_as_token=pad_as_token, **kw)


@pytest.mark.parametrize("pad_as_token", [False, True])
def test_hmm_varlen_rows(pad_as_token):
  c = _varlen_config(pad_as_token)
  exp_lib.validate_config(c, num_data_parallel=1)
  src = sources.get("hmm_varlen")
  tok = src.make_tokenizer(c)
  batch = next(src.train_iterator(c, tok))
  x, seg = batch["tokens"], batch["segment_ids"]
  assert x.shape == seg.shape == (8, 33) and (x[:, 0] == BOS).all()
  n = (x[:, 1:] != PAD).sum(1)
  assert n.min() >= 8 and n.max() <= 32
  # Symbols first, then PAD only; the padding is inside the segment only for the masked baseline.
  for row, k in zip(x, n):
    assert (row[1:1 + k] < 16).all() and (row[1 + k:] == PAD).all()
  if pad_as_token:
    assert (seg == 1).all()
  else:
    np.testing.assert_array_equal(seg.sum(1), 1 + n)
    assert (batch["positions"][seg == 0] == 0).all()
  again = next(src.train_iterator(c, tok))
  np.testing.assert_array_equal(again["tokens"], x)  # a pure function of (seed, split, index)
  ev = next(src.eval_iterator(c, tok, 8))
  assert not np.array_equal(ev["tokens"], x)


def test_hmm_varlen_lengths_are_uniform():
  rows = hmm_task.varlen_rows(*hmm_task.HMM16VarLen().sample(3, 5000), pad_as_token=False)
  n = rows["segment_ids"].sum(1) - 1
  counts = np.bincount(n, minlength=33)[8:33]
  assert counts.sum() == 5000 and counts.min() > 140 and counts.max() < 260  # 200 each, +- 4 sd


def test_hmm_varlen_bad_min_len_is_named():
  c = _varlen_config(False, data__min_len=40)
  with pytest.raises(config_lib.ConfigError, match="data.min_len"):
    exp_lib.validate_config(c, num_data_parallel=1)
  assert "hmm_varlen" in sources.names()


# -- exact-evaluator helpers -----------------------------------------------------------------------
def test_first_pad_lengths_and_holes():
  x = np.array([[1, 2, PAD, PAD], [1, PAD, 3, PAD], [1, 2, 3, 4], [PAD, PAD, PAD, PAD]])
  lens, holes = exact.first_pad_lengths(x, PAD)
  np.testing.assert_array_equal(lens, [2, 1, 4, 0])
  np.testing.assert_array_equal(holes, [False, True, False, False])


def test_length_tv_from_uniform():
  assert exact.length_tv_from_uniform(np.arange(8, 33), 8, 32) == pytest.approx(0.0)
  assert exact.length_tv_from_uniform(np.full(10, 5), 8, 32) == pytest.approx(1.0)  # all mass off support
  # Half the samples at 8, half at 9, support {8, 9, 10, 11}: 0.5 (|.5-.25| + |.5-.25| + .25 + .25) = 0.5.
  assert exact.length_tv_from_uniform([8, 9], 8, 11) == pytest.approx(0.5)
  assert exact.length_tv_from_uniform([8, 40, 41, 42], 8, 11) == pytest.approx(0.75)
  floor = exact.expected_tv_of_uniform_sample(500, 8, 32, draws=200)
  assert 0.05 < floor < 0.15  # a perfect sampler's 500-sample histogram is not at 0


def test_generation_report_on_data_and_unscorable():
  hmm = hmm_task.HMM16()
  ev = hmm.smoothed(1e-3)
  x = hmm.sample(4, 300, 32)
  rep = exact.generation_report(list(x), ev)
  assert rep["nll_per_token"] == pytest.approx(-ev.log_prob(x).sum() / x.size, rel=1e-12)
  assert rep["nll_per_token"] == pytest.approx(1.7745, abs=0.03) and rep["unscorable"] == 0
  assert rep["unigram_entropy"] == pytest.approx(2.0988, abs=0.05)
  vl = hmm_task.HMM16VarLen()
  xs, n = vl.sample(5, 400)
  seqs = [xs[i, :n[i]] for i in range(400)] + [np.array([1, BOS, 2]), np.array([], np.int64), np.arange(5)]
  rep = exact.generation_report(seqs, ev, vl.smoothed())
  assert rep["unscorable"] == 2 and rep["num_samples"] == 403
  tot = sum(-ev.log_prob(s[None], np.array([s.size]))[0] for s in seqs[:400] + seqs[-1:])
  assert rep["nll_per_token"] == pytest.approx(tot / (n.sum() + 5), rel=1e-10)
  assert rep["outside_support"] == pytest.approx(3 / 403)  # lengths 3, 0 and 5
  assert rep["len_hist"][5] == 1 and sum(rep["len_hist"]) == 403


def test_seed_intervals():
  m, lo, hi = metrics.t_interval([1.0, 3.0])
  assert m == 2.0 and hi - m == pytest.approx(12.7062047 * math.sqrt(2.0) / math.sqrt(2.0), rel=1e-6)
  m, lo, hi = metrics.t_interval([1.0, 2.0, 3.0])
  assert hi - m == pytest.approx(4.30265273 * 1.0 / math.sqrt(3.0), rel=1e-6)
  assert math.isnan(metrics.t_interval([5.0])[1])
  # Equal sizes and variances: Welch's df is 2 (n - 1) and the half-width is t * sqrt(2 s^2 / n).
  d, lo, hi = metrics.welch_interval([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
  assert d == pytest.approx(1.0) and hi - d == pytest.approx(2.77644511 * math.sqrt(2.0 / 3.0), rel=1e-6)
  assert metrics.welch_interval([1.0, 1.0], [0.0, 0.0]) == (1.0, 1.0, 1.0)


# -- the length law of the sampler ---------------------------------------------------------------------
def _uniform_prior(lo=8, hi=32):
  p = np.zeros(hi + 1)
  p[lo:hi + 1] = 1.0 / (hi - lo + 1)
  return p


def test_posterior_missing_matches_enumeration():
  prior = _uniform_prior(2, 9)
  for m, t in ((0, 1.0), (0, 0.7), (3, 0.5), (5, 0.9), (9, 0.2), (10, 0.5)):
    alpha = 1.0 - t
    w = {n: prior[n] * math.comb(n, m) * alpha**m * (1 - alpha)**(n - m) for n in range(m, 10) if prior[n] > 0}
    want = sum(w[n] * (n - m) for n in w) / sum(w.values()) if w and sum(w.values()) > 0 else 0.0
    assert did_lengths.posterior_missing(prior, m, t) == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_length_law_limits():
  prior = _uniform_prior()
  k = np.arange(33)
  one = did_lengths.sampler_length_law(prior, 1, 32)
  assert one.shape == (2, 33) and one[-1, 1] == pytest.approx(1.0)  # one gap, one insertion at most
  many = did_lengths.sampler_length_law(prior, 256, 32)
  assert np.abs(many[-1] - prior).sum() / 2 < 0.03  # continuous-time limit: the data law
  assert (many[-1] * k).sum() == pytest.approx(20.0, abs=0.1)
  assert (did_lengths.sampler_length_law(prior, 4, 32, "fixed")[-1] * k).sum() == pytest.approx(15.0)
  for laws in (one, many):
    np.testing.assert_allclose(laws.sum(1), 1.0, atol=1e-12)


def _law_score_fn(prior, num_steps, capacity, mode):
  """A one-token model whose per-gap mass is the calibrated one of `sampler_length_law` (lookup by m, t)."""
  table = np.full((num_steps, capacity + 2), -np.inf)
  for i in range(num_steps):
    t = 1.0 - i / num_steps
    for m in range(capacity + 1):
      total = capacity - m if mode == "fixed" else did_lengths.posterior_missing(prior, m, t)
      if total > 0:
        table[i, m] = math.log(total / (m + 1))
  table = jnp.asarray(table, jnp.float32)

  def fn(tokens, lengths, t):
    i = jnp.clip(jnp.round((1.0 - t) * num_steps).astype(jnp.int32), 0, num_steps - 1)
    per_gap = table[i, jnp.clip(lengths - 1, 0, capacity + 1)]  # [B]
    b, r = tokens.shape
    col = jnp.broadcast_to(per_gap[:, None, None], (b, r, 1))
    return jnp.concatenate([jnp.full((b, r, 1), -jnp.inf), col], axis=-1)  # column 0 = BOS, column 1 = 'a'

  return fn


@pytest.mark.parametrize("num_steps,mode", [(4, "variable"), (8, "variable"), (4, "fixed")])
def test_length_law_is_the_law_of_the_real_sampler(num_steps, mode):
  """The exact length law equals did_sample's empirical one when the scores are the calibrated masses:
  this pins kappa = 1 / (T - i) and the per-gap clipping min(1, kappa s) of the sampler to the spec."""
  prior, cap, n = _uniform_prior(), 32, 4000
  fn = _law_score_fn(prior, num_steps, cap, mode)
  with jax.enable_x64(True):
    _, lens, _, _ = did_sample(fn, jax.random.key(1), n, num_steps, cap, bos_id=0)
  emp = np.bincount(np.asarray(lens), minlength=cap + 1) / n
  law = did_lengths.sampler_length_law(prior, num_steps, cap, mode)[-1]
  assert np.abs(emp - law).sum() / 2 < 0.06  # 4000 draws over <= 33 cells: sampling TV about 0.03
  k = np.arange(cap + 1)
  assert emp @ k == pytest.approx(law @ k, abs=0.3)


def test_kappa_and_clipping_on_one_gap():
  """capacity 1, T = 3, one token of constant mass s in the only gap: step i inserts with probability
  min(1, kappa_i s), kappa = (1/3, 1/2, 1), and the first insertion fills the buffer, so
  P(length 1) = 1 - prod_i (1 - min(1, kappa_i s)). (kappa = 1/T on every step but the last, or a
  no-insert weight left unclipped, moves these by > 4 sd.)"""
  def const(s):
    def fn(tokens, lengths, t):
      b, r = tokens.shape
      return jnp.concatenate([jnp.full((b, r, 1), -jnp.inf), jnp.full((b, r, 1), math.log(s))], axis=-1)
    return fn
  n = 20000
  for s in (0.5, 0.2, 3.0, 4.5):  # 4.5: kappa_1 s = 1.5, the clipped case
    want = 1.0 - np.prod([1.0 - min(1.0, k * s) for k in (1 / 3, 1 / 2, 1.0)])
    with jax.enable_x64(True):
      _, lens, _, _ = did_sample(const(s), jax.random.key(2), n, 3, 1, bos_id=0)
    p = float(np.mean(np.asarray(lens)))
    assert p == pytest.approx(want, abs=4 * math.sqrt(want * (1 - want) / n) + 1e-9), s


# -- the count head's calibration helper ---------------------------------------------------------------
@pytest.mark.parametrize("variant", ["fixed", "variable"])
def test_insertion_mass(variant):
  c = tiny_config(method="did", data__source="hmm_varlen", data__seq_len=33, model__max_len=64,
                  did__variant=variant, model__time_conditioning=variant == "variable",
                  sample__decoder="did")
  exp = exp_lib.Experiment.create(c)
  batch = {k: jnp.asarray(v) for k, v in next(exp_lib.make_train_iterator(c, exp.tokenizer)).items()}
  params = exp.init_state(0).params
  t = jnp.linspace(0.1, 0.9, 8)
  out = jax.jit(exp.method.insertion_mass)(params, batch, jax.random.key(0), t)
  n = np.asarray(batch["segment_ids"]).sum(1) - 1
  np.testing.assert_array_equal(out["n"], n)
  np.testing.assert_array_equal(out["missing"], out["n"] - out["m"])
  assert (np.asarray(out["m"]) <= n).all() and np.asarray(out["m"])[0] > np.asarray(out["m"])[-1] - 30
  if variant == "fixed":  # seqnorm: the mass is n - m by construction
    np.testing.assert_allclose(out["pred"], np.asarray(out["missing"]) + 1e-4, rtol=1e-5)
  else:
    assert np.isfinite(out["pred"]).all() and (np.asarray(out["pred"]) > 0).all()
