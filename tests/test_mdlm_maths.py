"""MDLM maths against the oracles of spec/mdlm.md (closed forms, exact enumeration)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.diffusion import masked as mdlm
from dlm_jax.diffusion import schedules

SCHED = schedules.LogLinearSchedule()


def test_schedules_weights():
  t = jnp.array([0.1, 0.5, 0.9])
  np.testing.assert_allclose(SCHED.weight(t), 1.0 / t, rtol=1e-6)
  np.testing.assert_allclose(schedules.LogLinearSchedule(eps=1e-3).weight(t), 1.0 / t, rtol=1e-6)
  cos = schedules.CosineSchedule()
  assert float(cos.alpha(0.0)) == pytest.approx(1.0)
  assert float(cos.alpha(1.0)) == pytest.approx(0.0, abs=1e-7)
  # Near t = 0 the cosine weight behaves like 2/t.
  assert float(cos.weight(1e-2)) * 1e-2 == pytest.approx(2.0, rel=2e-3)
  with pytest.raises(ValueError, match="config.diffusion.schedule"):
    schedules.get_schedule("linear")



def test_schedules_with_eps():
  """eps > 0 (the configs' `diffusion.eps`): alpha runs from 1 to eps, dalpha_dt is its derivative
  and the weight is -alpha' / (1 - alpha), for both schedules."""
  t = jnp.array([0.1, 0.5, 0.9])
  for sched in (schedules.LogLinearSchedule(eps=0.1), schedules.CosineSchedule(eps=0.1),
                schedules.get_schedule("cosine", eps=0.1)):
    assert float(sched.alpha(0.0)) == pytest.approx(1.0, abs=1e-7)
    assert float(sched.alpha(1.0)) == pytest.approx(0.1, abs=1e-7)
    np.testing.assert_allclose(sched.mask_prob(t), 1.0 - sched.alpha(t), rtol=1e-6)
    if hasattr(sched, "dalpha_dt"):
      np.testing.assert_allclose(sched.dalpha_dt(t), jax.vmap(jax.grad(sched.alpha))(t), rtol=1e-5)
    deriv = jax.vmap(jax.grad(sched.alpha))(t)
    np.testing.assert_allclose(sched.weight(t), -deriv / (1.0 - sched.alpha(t)), rtol=1e-5)
  assert schedules.get_schedule("loglinear") == schedules.LogLinearSchedule(eps=0.0)


@pytest.mark.parametrize("mode", mdlm.TIME_SAMPLING_MODES)
def test_sample_times_each_mode_by_hand(mode):
  """Every time-sampling mode against its formula, on global indices 4..7 of a global batch of 8
  (given as an offset, or as an explicit `index`, which is what is used when given)."""
  key, n, t_min = jax.random.key(3), 8, 0.1
  idx = np.arange(4, 8)
  t = np.asarray(mdlm.sample_times(key, 4, t_min, mode, index_offset=4, global_batch=n))
  u_i = np.array([float(jax.random.uniform(jax.random.fold_in(key, int(i)))) for i in idx])
  u = {"stratified": (idx + u_i) / n, "iid": u_i,
       "vdm": np.mod(float(jax.random.uniform(key)) + idx / n, 1.0)}[mode]
  np.testing.assert_allclose(t, t_min + (1.0 - t_min) * u, rtol=1e-6, atol=1e-7)
  assert t.min() >= t_min and t.max() < 1.0
  rev = mdlm.sample_times(key, 4, t_min, mode, global_batch=n, index=jnp.asarray(idx[::-1]))
  np.testing.assert_allclose(np.asarray(rev), t[::-1], rtol=1e-6)


def test_nelbo_draws_t_within_t_min_and_one():
  """With t in [t_min, 1) and the log-linear schedule, a uniform model's per-sequence NELBO is
  L log(V-1) in expectation for any t_min; at t_min = 0.999 every token is masked with
  probability >= 0.999 and the weight is ~1, so the estimate is that value almost surely
  (t past 1 would mask everything at a weight below 1 and come out low)."""
  b, l, v = 64, 6, 5
  x0 = jax.random.randint(jax.random.key(0), (b, l), 0, 4)
  fn = lambda xt: jnp.zeros(xt.shape + (v,))  # noqa: E731
  per_seq = mdlm.nelbo(fn, x0, jnp.ones((b, l), bool), jax.random.key(1), SCHED, 4, num_t=4,
                       t_min=0.999)
  np.testing.assert_allclose(np.asarray(per_seq), l * math.log(4), rtol=2e-3)

def test_o1_uniform_fixed_mask_instance():
  # V' = 4 real tokens + MASK (id 4); uniform logits over the real ones.
  logits = jnp.zeros((1, 4, 5))
  x0 = jnp.array([[0, 1, 2, 3]])
  is_masked = jnp.array([[True, False, True, False]])
  valid = jnp.ones((1, 4), bool)
  for t, summed, token in ((0.25, 11.0903549, 2.7725887), (0.5, 5.5451774, 1.3862944)):
    loss_sum, _ = mdlm.mdlm_loss(logits, x0, is_masked, jnp.array([t]), SCHED, valid, 4, "sum")
    loss_tok, _ = mdlm.mdlm_loss(logits, x0, is_masked, jnp.array([t]), SCHED, valid, 4, "token")
    assert float(loss_sum) == pytest.approx(summed, rel=1e-6)
    assert float(loss_tok) == pytest.approx(token, rel=1e-6)



def test_mdlm_loss_aux_normalisations_and_default():
  """By hand, uniform logits over 4 real tokens (CE = log 4 per masked slot), log-linear w = 1/t:
  row 0 has 3 valid slots, 2 masked, t = 0.5; row 1 one valid slot, masked, t = 0.25 (its
  masked padding slot does not count). per_seq = (4 log 4, 4 log 4); the aux sums feed the
  evaluation's NELBO; "token" (the default) divides by all valid slots, "sequence" per row."""
  log4 = math.log(4.0)
  logits = jnp.zeros((2, 3, 5))
  x0 = jnp.array([[0, 1, 2], [3, 0, 1]])
  is_masked = jnp.array([[True, False, True], [True, False, True]])
  valid = jnp.array([[True, True, True], [True, False, False]])
  t = jnp.array([0.5, 0.25])
  args = (logits, x0, is_masked, t, SCHED, valid, 4)
  loss, aux = mdlm.mdlm_loss(*args)
  assert float(loss) == pytest.approx(2 * log4, rel=1e-6)
  np.testing.assert_allclose(np.asarray(aux["per_seq"]), [4 * log4, 4 * log4], rtol=1e-6)
  assert float(aux["nll_sum"]) == pytest.approx(8 * log4, rel=1e-6)
  assert float(aux["token_count"]) == 4.0 and float(aux["masked_count"]) == 3.0
  seq, _ = mdlm.mdlm_loss(*args, "sequence")
  assert float(seq) == pytest.approx((4 * log4 / 3 + 4 * log4) / 2, rel=1e-6)
  one, _ = mdlm.mdlm_loss(logits[1:], x0[1:], is_masked[1:], t[1:], SCHED, valid[1:], 4, "token")
  assert float(one) == pytest.approx(4 * log4, rel=1e-6)  # one valid token: divided by 1

@pytest.mark.parametrize("schedule", [schedules.LogLinearSchedule(), schedules.CosineSchedule()])
def test_o1_uniform_expectation_is_log_v(schedule):
  b, l, v = 4096, 16, 5
  x0 = jax.random.randint(jax.random.key(0), (b, l), 0, 4)
  fn = lambda xt: jnp.zeros(xt.shape + (v,))  # noqa: E731
  per_seq = mdlm.nelbo(fn, x0, jnp.ones((b, l), bool), jax.random.key(1), schedule, 4, num_t=4)
  est = float(jnp.sum(per_seq) / (b * l))
  se = float(jnp.std(per_seq / l) / math.sqrt(b))
  assert abs(est - math.log(4)) < 4 * se + 1e-3, (est, se)


def test_o2_context_free_model_matches_data_nll():
  q = jnp.array([0.5, 0.25, 0.25])
  b, l = 4096, 8
  x0 = jax.random.categorical(jax.random.key(2), jnp.log(q), shape=(b, l))
  logits = jnp.concatenate([jnp.log(q), jnp.array([0.0])])  # mask column ignored by SUBS
  fn = lambda xt: jnp.broadcast_to(logits, xt.shape + (4,))  # noqa: E731
  per_seq = mdlm.nelbo(fn, x0, jnp.ones((b, l), bool), jax.random.key(3), SCHED, 3, num_t=8)
  target = float(-jnp.mean(jnp.log(q)[x0]))  # -(1/L) sum log q(x0_l), averaged
  est = float(jnp.mean(per_seq) / l)
  se = float(jnp.std(per_seq / l) / math.sqrt(b))
  assert abs(est - target) < 4 * se, (est, target, se)
  assert target == pytest.approx(1.0397208, abs=0.02)  # the entropy, up to sampling noise


def test_o3_perfect_predictor_zero():
  x0 = jax.random.randint(jax.random.key(4), (8, 16), 0, 10)
  logits = jnp.where(jax.nn.one_hot(x0, 11) > 0, 0.0, -1e9)
  xt, m = mdlm.forward_mask(jax.random.key(5), x0, jnp.full((8,), 0.7), jnp.ones((8, 16), bool),
                            SCHED, 10)
  loss, aux = mdlm.mdlm_loss(logits, x0, m, jnp.full((8,), 0.7), SCHED, jnp.ones((8, 16), bool),
                             10, "token")
  assert float(loss) == pytest.approx(0.0, abs=1e-6)
  assert float(aux["masked_count"]) > 0


def test_no_masked_slot_contributes_zero_not_nan():
  x0 = jnp.zeros((2, 4), jnp.int32)
  loss, aux = mdlm.mdlm_loss(jnp.zeros((2, 4, 3)), x0, jnp.zeros((2, 4), bool),
                             jnp.array([1e-3, 0.5]), SCHED, jnp.ones((2, 4), bool), 2, "token")
  assert float(loss) == 0.0 and np.all(np.isfinite(aux["per_seq"]))


def _bayes(data: dict[str, float]):
  """Exact p(x0_l | visible) of a small distribution over 2-letter strings 'a'/'b'."""
  seqs = np.array([[{"a": 0, "b": 1}[c] for c in s] for s in data])
  probs = np.array(list(data.values()))

  def log_prob_fn(x0, mask):
    consistent = np.all((seqs == x0) | mask[None], axis=1)
    post = probs * consistent
    post = post / post.sum()
    return np.log(np.array([post[seqs[:, l] == x0[l]].sum() for l in range(len(x0))]))

  def logits_fn(xt):  # jnp version for the Monte Carlo estimator; MASK id = 2
    s = jnp.asarray(seqs)
    consistent = jnp.all((xt[:, None, :] == 2) | (xt[:, None, :] == s[None]), axis=-1)
    post = jnp.asarray(probs)[None] * consistent
    post = post / jnp.sum(post, axis=1, keepdims=True)
    marg = jnp.einsum("bd,dlv->blv", post, jax.nn.one_hot(s, 3))
    return jnp.log(marg + 1e-30)

  return log_prob_fn, logits_fn


def test_o4_exact_enumeration():
  lp, _ = _bayes({"aa": 0.5, "bb": 0.5})
  assert mdlm.exact_nelbo_enumerate(lp, np.array([0, 0])) == pytest.approx(0.6931472, abs=1e-6)
  data = {"ab": 0.5, "ba": 0.25, "aa": 0.25}
  lp, _ = _bayes(data)
  got = [mdlm.exact_nelbo_enumerate(lp, np.array([{"a": 0, "b": 1}[c] for c in s])) for s in data]
  np.testing.assert_allclose(got, [0.6931472, 1.3862944, 1.3862944], atol=1e-6)
  assert sum(p * g for p, g in zip(data.values(), got)) == pytest.approx(1.0397208, abs=1e-6)



def _exact_nelbo_through_the_loss(logits_fn, x0, mask_id, nodes=8):
  """Exact NELBO of one sequence through the production loss: integral over t of
  E_mask[w(t) sum CE] with every mask pattern enumerated (P = t^k (1 - t)^(L - k) for the
  log-linear schedule) and Gauss-Legendre in t (the integrand is a polynomial of degree L - 1).
  One batched `mdlm_loss` call scores every (pattern, node) row."""
  length = len(x0)
  g, gw = np.polynomial.legendre.leggauss(nodes)
  ts, ws = (g + 1) / 2, gw / 2
  patterns = np.array(list(itertools.product([False, True], repeat=length)))
  rows_m = np.repeat(patterns, len(ts), axis=0)
  rows_t = np.tile(ts, len(patterns))
  rows_w = np.tile(ws, len(patterns))
  p_mask = np.prod(np.where(rows_m, rows_t[:, None], 1 - rows_t[:, None]), axis=1)
  x = jnp.tile(jnp.asarray(x0, jnp.int32)[None], (len(rows_t), 1))
  xt = jnp.where(rows_m, mask_id, x)
  _, aux = mdlm.mdlm_loss(logits_fn(xt), x, jnp.asarray(rows_m), jnp.asarray(rows_t, jnp.float32),
                          SCHED, jnp.ones_like(x, bool), mask_id, "sum")
  return float(np.sum(rows_w * p_mask * np.asarray(aux["per_seq"], np.float64)))


def test_o4_exact_enumeration_through_the_loss():
  """O4 with the loss the trainer minimises (not the test-only enumerator): the Bayes-optimal
  denoiser's NELBO is -log p(x0) for each sequence of the spec's data."""
  _, logits_fn = _bayes({"aa": 0.5, "bb": 0.5})
  assert _exact_nelbo_through_the_loss(logits_fn, [0, 0], 2) == pytest.approx(0.6931472, abs=1e-5)
  data = {"ab": 0.5, "ba": 0.25, "aa": 0.25}
  _, logits_fn = _bayes(data)
  got = [_exact_nelbo_through_the_loss(logits_fn, [{"a": 0, "b": 1}[c] for c in s], 2)
         for s in data]
  np.testing.assert_allclose(got, [0.6931472, 1.3862944, 1.3862944], atol=1e-5)
  assert sum(p * g for p, g in zip(data.values(), got)) == pytest.approx(1.0397208, abs=1e-5)


def test_monte_carlo_nelbo_converges_to_exact():
  data = {"ab": 0.5, "ba": 0.25, "aa": 0.25}
  _, logits_fn = _bayes(data)
  b = 8192
  for s, exact in (("ab", 0.6931472), ("ba", 1.3862944)):
    x0 = jnp.tile(jnp.array([[{"a": 0, "b": 1}[c] for c in s]]), (b, 1))
    per_seq = mdlm.nelbo(logits_fn, x0, jnp.ones((b, 2), bool), jax.random.key(7), SCHED, 2,
                         num_t=8)
    se = float(jnp.std(per_seq) / math.sqrt(b))
    assert abs(float(jnp.mean(per_seq)) - exact) < 4 * se + 1e-3, (s, float(jnp.mean(per_seq)))


def test_o5_subs_cross_entropy_and_carry_over():
  logits = jnp.array([[[2.0, 1.0, 0.0, 5.0]]])
  ce = mdlm.masked_cross_entropy(logits, jnp.array([[0]]), mask_id=3)
  assert float(ce[0, 0]) == pytest.approx(0.4076060, abs=1e-6)
  lp = mdlm.subs_log_probs(logits, mask_id=3, xt=jnp.array([[1]]))
  np.testing.assert_array_equal(np.exp(np.asarray(lp[0, 0])), [0.0, 1.0, 0.0, 0.0])
  lp_masked = mdlm.subs_log_probs(logits, mask_id=3, xt=jnp.array([[3]]))
  assert float(jnp.exp(lp_masked[0, 0, 3])) == 0.0


def _uniforms_at(monkeypatch, value):
  """Every jax.random.uniform draw returns `value` (scaled to [minval, maxval))."""
  def fixed(key, shape=(), dtype=jnp.float32, minval=0.0, maxval=1.0):
    del key
    return minval + (maxval - minval) * jnp.full(shape, value, dtype)
  monkeypatch.setattr(jax.random, "uniform", fixed)


def test_o6_stratified_times(monkeypatch):
  n, t_min = 4, 1e-3
  # Property: across draws exactly one t falls in each stratum.
  for seed in range(50):
    t = np.asarray(mdlm.sample_times(jax.random.key(seed), n, t_min))
    assert (t >= t_min).all() and (t < 1.0).all()
    strata = np.floor((t - t_min) / (1 - t_min) * n).astype(int)
    np.testing.assert_array_equal(np.sort(strata), np.arange(n))
  # The spec's numbers through sample_times itself, with every U_i = 0.5.
  _uniforms_at(monkeypatch, 0.5)
  key = jax.random.key(11)
  np.testing.assert_allclose(mdlm.sample_times(key, n, t_min, "stratified"),
                             [0.125875, 0.375625, 0.625375, 0.875125], rtol=1e-6)
  # A slice of the global batch (index_offset, global_batch) gets its strata, not the first ones.
  np.testing.assert_allclose(mdlm.sample_times(key, 2, t_min, "stratified", index_offset=2,
                                               global_batch=4), [0.625375, 0.875125], rtol=1e-6)
  # "vdm": one shared U, u_i = (U + i / N) mod 1 -> (0.5, 0.75, 0, 0.25); "iid": u_i = U_i.
  np.testing.assert_allclose(mdlm.sample_times(key, n, t_min, "vdm"),
                             t_min + (1 - t_min) * np.array([0.5, 0.75, 0.0, 0.25]), rtol=1e-6)
  np.testing.assert_allclose(mdlm.sample_times(key, n, t_min, "iid"),
                             np.full(n, t_min + (1 - t_min) * 0.5), rtol=1e-6)
  with pytest.raises(ValueError, match="time_sampling"):
    mdlm.sample_times(key, n, t_min, "uniform")


def test_stratified_slices_match_global_batch():
  key = jax.random.key(3)
  full = mdlm.sample_times(key, 8, 1e-3, "stratified")
  parts = [mdlm.sample_times(key, 2, 1e-3, "stratified", index_offset=i, global_batch=8)
           for i in range(0, 8, 2)]
  np.testing.assert_allclose(jnp.concatenate(parts), full, rtol=1e-7)
