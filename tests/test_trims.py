"""Tests of dlm_jax.diffusion.trims against the oracles of spec/trims.md."""

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.trims import buckets as trims_buckets
from dlm_jax.trims import loss as trims_loss
from dlm_jax.trims import masks as trims_masks
from dlm_jax.trims import metrics as trims_metrics
from dlm_jax.trims import scoring as trims_scoring
from dlm_jax import metrics as metrics_lib
from dlm_jax.diffusion import keys as keys_lib

D_K4 = (0.1, 2.3, 0.0, 1.5, 0.7, 3.0, 0.2, 0.05)
B_K4 = (3, 1, 4, 2, 2, 1, 3, 4)
K8_FRACTIONS = (0.95, 0.8375, 0.725, 0.6125, 0.5, 0.3875, 0.275, 0.1625)


@functools.partial(jax.jit, static_argnames=("K", "k_law"))
def _trims_batch(keys, buckets, K, k_law="uniform"):
  return trims_masks.trims_mask_batch(keys, buckets, K=K, k_law=k_law)


# ------------------------------------------------------------------------------------------------ buckets


def test_buckets_k4_oracle_and_easy_first():
  b = trims_buckets.assign_buckets(D_K4, None, K=4)
  assert b.dtype == np.int8
  np.testing.assert_array_equal(b, B_K4)
  np.testing.assert_array_equal(trims_buckets.assign_buckets(D_K4, None, K=4, order="easy_first"), (2, 4, 1, 3, 3, 4, 2, 1))


def test_buckets_ties_earlier_slot_is_harder():
  np.testing.assert_array_equal(trims_buckets.assign_buckets([1.0, 1.0, 0.5, 0.5], None, K=2), (1, 1, 2, 2))
  # All equal: pure slot order.
  np.testing.assert_array_equal(trims_buckets.assign_buckets(np.zeros(4), None, K=4), (1, 2, 3, 4))


def test_bucket_sizes():
  np.testing.assert_array_equal(trims_buckets.bucket_sizes(trims_buckets.assign_buckets(np.arange(5.0), None, K=2), 2), (3, 2))
  rng = np.random.default_rng(0)
  b = trims_buckets.assign_buckets(rng.random(25), None, K=8)
  np.testing.assert_array_equal(trims_buckets.bucket_sizes(b, 8), (4, 3, 3, 3, 3, 3, 3, 3))
  # Always K counts, empty buckets included; bucket 0 (never masked) is not counted.
  np.testing.assert_array_equal(trims_buckets.bucket_sizes([[1, 1, 2, 0], [0, 0, 1, 0]], 4),
                                (3, 1, 0, 0))


def test_buckets_invalid_slots_are_zero_and_ranked_among_valid_only():
  d = np.array([9.0, 0.1, 2.3, 0.0, 1.5, 0.7, 3.0, 0.2, 0.05, 9.0])
  valid = np.array([False] + [True] * 8 + [False])
  b = trims_buckets.assign_buckets(d, valid, K=4)
  np.testing.assert_array_equal(b, (0,) + B_K4 + (0,))
  assert (trims_buckets.assign_buckets(d, np.zeros(10, bool), K=4) == 0).all()


def test_buckets_batched_matches_rows_and_jnp_version():
  rng = np.random.default_rng(1)
  d = np.round(rng.random((6, 13)) * 4) / 4  # many ties
  valid = rng.random((6, 13)) < 0.8
  for order in ("hard_first", "easy_first"):
    batched = trims_buckets.assign_buckets(d, valid, K=4, order=order)
    rows = np.stack([trims_buckets.assign_buckets(d[i], valid[i], K=4, order=order) for i in range(6)])
    np.testing.assert_array_equal(batched, rows)
    np.testing.assert_array_equal(np.asarray(trims_buckets.assign_buckets_jnp(d, valid, K=4, order=order)), batched)



def test_buckets_jnp_without_valid_and_on_one_response():
  """valid=None (all valid) and a single [R] response give the host version's labels too."""
  d = np.array([[0.3, 0.9, 0.1, 0.5, 0.2], [1.0, 2.0, 3.0, 4.0, 5.0]])
  for order in ("hard_first", "easy_first"):
    np.testing.assert_array_equal(np.asarray(trims_buckets.assign_buckets_jnp(d, None, K=4, order=order)),
                                  trims_buckets.assign_buckets(d, None, K=4, order=order))
    np.testing.assert_array_equal(np.asarray(trims_buckets.assign_buckets_jnp(d[0], None, K=4, order=order)),
                                  trims_buckets.assign_buckets(d[0], None, K=4, order=order))
  np.testing.assert_array_equal(np.asarray(trims_buckets.assign_buckets_jnp(d[1], K=4)), [4, 3, 2, 1, 1])




def test_bucket_count_bounds_and_prompt_slots():
  """K runs over 1..127 (int8 labels), both ends allowed; prompt/padding slots (bucket 0) have
  mask probability 0 for every k; a random order needs one seed per response."""
  for K in (1, 127):
    trims_buckets.check_num_buckets(K)
  for K in (0, 128, 2.0):
    with pytest.raises(ValueError, match="K .number of buckets."):
      trims_buckets.check_num_buckets(K)
  b = jnp.asarray([0, 1, 2, 3, 0], jnp.int8)
  for k in range(3):
    p = np.asarray(trims_masks.trims_mask_probs(b, k, 0.05, 0.95))
    assert p[0] == 0.0 and p[-1] == 0.0
    np.testing.assert_allclose(p[1:4], [0.05 if j <= k else 0.95 for j in (1, 2, 3)], rtol=1e-6)
  with pytest.raises(ValueError):
    trims_buckets.assign_buckets(np.ones((2, 4)), K=2, order="random", seed=[1, 2, 3])

def test_bits_and_perplexity_of_one_token():
  """The shared likelihood conversions at a count of one token (and of none)."""
  assert metrics_lib.bits_per_token(3.0, 1) == pytest.approx(3.0 / math.log(2.0))
  assert metrics_lib.perplexity_bound(2.0, 1) == pytest.approx(math.exp(2.0))
  assert metrics_lib.bits_per_token(0.0, 0) == 0.0 and metrics_lib.perplexity_bound(0.0, 0) == 1.0
  assert metrics_lib.tokens_per_forward(np.array([3, 4]), np.array([1, 1])) == pytest.approx(3.5)

@pytest.mark.parametrize("k_law", ["uniform", "tied_to_t", None])
def test_trims_mask_returns_the_t_of_its_law(k_law):
  """k_law="uniform" (the default): k ~ U{0..K-1} and t = the nominal masked fraction of k (what a
  1/t weighting divides by); "tied_to_t": t ~ U(t_min, 1) and k = k_from_t(t)."""
  buckets = jnp.asarray(np.tile(np.repeat(np.arange(1, 9), 4), (256, 1)).astype(np.int8))
  keys = jax.random.split(jax.random.key(5), 256)
  if k_law is None:
    _, k, t = trims_masks.trims_mask_batch(keys, buckets)
  else:
    _, k, t = trims_masks.trims_mask_batch(keys, buckets, K=8, p_context=0.1, p_future=0.9,
                                           k_law=k_law, t_min=0.3)
  k, t = np.asarray(k), np.asarray(t, np.float64)
  # tied_to_t with t >= 0.3: k = floor(8 (1 - t)) <= 5.
  assert sorted(set(k.tolist())) == list(range(6 if k_law == "tied_to_t" else 8))
  if k_law == "tied_to_t":
    assert t.min() >= 0.3 and t.max() < 1.0
    np.testing.assert_array_equal(k, np.minimum(7, np.floor((1.0 - t) * 8)))
  else:
    pc, pf = (0.05, 0.95) if k_law is None else (0.1, 0.9)
    np.testing.assert_allclose(t, (pf * (8 - k) + pc * k) / 8, rtol=1e-6)
  if k_law is None:  # the default t_min of "tied_to_t" keeps t in [1e-3, 1)
    _, _, t = trims_masks.trims_mask_batch(keys, buckets, k_law="tied_to_t")
    assert float(jnp.min(t)) >= 1e-3 and float(jnp.max(t)) < 1.0

def test_buckets_random_order_is_seeded_permutation_of_hard_first():
  rng = np.random.default_rng(2)
  d = rng.random((3, 25))
  valid = np.ones((3, 25), bool)
  valid[:, 20:] = False
  hard = trims_buckets.assign_buckets(d, valid, K=8)
  rnd = trims_buckets.assign_buckets(d, valid, K=8, order="random", seed=[5, 6, 7])
  for i in range(3):
    np.testing.assert_array_equal(np.sort(rnd[i]), np.sort(hard[i]))
  assert (rnd[:, 20:] == 0).all()
  assert not np.array_equal(rnd, hard)
  np.testing.assert_array_equal(trims_buckets.assign_buckets(d[1], valid[1], K=8, order="random", seed=6), rnd[1])
  assert not np.array_equal(trims_buckets.assign_buckets(d[1], valid[1], K=8, order="random", seed=5), rnd[1])
  with pytest.raises(ValueError, match="seed"):
    trims_buckets.assign_buckets(d, valid, K=8, order="random")


def test_buckets_reject_bad_input():
  with pytest.raises(ValueError, match="order"):
    trims_buckets.assign_buckets(D_K4, None, K=4, order="hardest")
  with pytest.raises(ValueError, match="NaN"):
    trims_buckets.assign_buckets([1.0, float("nan")], None, K=2)


# ------------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("k,expected_context,expected_count", [
    (0, (), 7.6), (1, (1, 5), 5.8), (2, (1, 3, 4, 5), 4.0), (3, (0, 1, 3, 4, 5, 6), 2.2)])
def test_mask_probabilities_k4(k, expected_context, expected_count):
  p = np.asarray(trims_masks.trims_mask_probs(jnp.asarray(B_K4), k))
  want = np.full(8, 0.95, np.float32)
  want[list(expected_context)] = 0.05
  np.testing.assert_allclose(p, want, rtol=1e-6)
  assert p.sum() == pytest.approx(expected_count, abs=1e-5)


def test_k8_masked_fraction_table_and_mean():
  buckets = jnp.asarray(trims_buckets.assign_buckets(np.random.default_rng(0).random(24), None, K=8))  # equal buckets of 3
  fr = [float(trims_masks.trims_mask_probs(buckets, k).mean()) for k in range(8)]
  np.testing.assert_allclose(fr, K8_FRACTIONS, atol=1e-6)
  np.testing.assert_allclose(np.asarray(trims_masks.nominal_masked_fraction(jnp.arange(8), 8)), K8_FRACTIONS, atol=1e-6)
  assert np.mean(fr) == pytest.approx(0.55625, abs=1e-6)
  # Monte Carlo over the uniform k law.
  keys = jax.random.split(jax.random.key(0), 20000)
  mask, k, _ = _trims_batch(keys, jnp.broadcast_to(buckets, (20000, 24)), K=8)
  assert float(mask.mean()) == pytest.approx(0.55625, abs=0.005)
  k = np.asarray(k)
  assert set(np.unique(k)) == set(range(8))
  per_k = [float(np.asarray(mask)[k == j].mean()) for j in range(8)]
  np.testing.assert_allclose(per_k, K8_FRACTIONS, atol=0.01)


def _random_buckets(seed, n=512, r=40, K=8):
  """[n, r] buckets with a random valid window per row and random holes (bucket 0 elsewhere)."""
  rng = np.random.default_rng(seed)
  pos = np.arange(r)[None, :]
  start, stop = rng.integers(0, r // 2, (n, 1)), rng.integers(r // 2, r + 1, (n, 1))
  valid = (pos >= start) & (pos < stop) & (rng.random((n, r)) < 0.9)
  return trims_buckets.assign_buckets(rng.random((n, r)), valid, K=K)


def _standard_corrupt(buckets, seed, time_sampling="example"):
  """Standard SFT masking as training runs it: MDLM.corrupt of the S arm's config on rows whose
  maskable slots are buckets > 0. Returns (is_masked [N, R], t [N]) as numpy."""
  from configs import arith_sft_standard  # pylint: disable=g-import-not-at-top
  from dlm_jax.methods.base import SpecialIds  # pylint: disable=g-import-not-at-top
  from dlm_jax.methods.mdlm import MDLM  # pylint: disable=g-import-not-at-top
  cfg = arith_sft_standard.get_config()
  cfg.diffusion.time_sampling = time_sampling
  method = MDLM(cfg, SpecialIds(bos=16, eos=17, mask=19, pad=18, vocab_size=20))
  n, r = buckets.shape
  batch = dict(tokens=jnp.zeros((n, r), jnp.int32), segment_ids=jnp.ones((n, r), jnp.int32),
               positions=jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32), (n, r)),
               maskable=jnp.asarray(buckets) > 0, example_id=jnp.arange(n, dtype=jnp.int32))
  _, is_masked, t, _ = jax.jit(method.corrupt)(batch, jax.random.key(seed))
  return np.asarray(is_masked), np.asarray(t)


def test_mask_never_touches_bucket0_property():
  for seed in range(2):
    buckets = _random_buckets(seed)
    keys = jax.random.split(jax.random.key(7 + seed), 512)
    for law in ("uniform", "tied_to_t"):
      mask, _, _ = _trims_batch(keys, jnp.asarray(buckets), K=8, k_law=law)
      mask = np.asarray(mask)
      assert not mask[buckets == 0].any()
      assert mask[buckets > 0].any() and not mask[buckets > 0].all()
    m, t = _standard_corrupt(buckets, seed)
    assert not m[buckets == 0].any() and m[buckets > 0].any() and t.shape == (512,)


def test_empirical_mask_rate_per_bucket_and_k():
  n = 100_000
  keys = jax.random.split(jax.random.key(11), n)
  buckets = jnp.broadcast_to(jnp.asarray(B_K4, jnp.int8), (n, 8))
  mask, k, _ = _trims_batch(keys, buckets, K=4)
  mask, k = np.asarray(mask, np.float64), np.asarray(k)
  b = np.asarray(B_K4)
  for kk in range(4):
    rows = mask[k == kk]
    assert rows.shape[0] > 20_000
    for bucket in range(1, 5):
      rate = rows[:, b == bucket].mean()
      want = 0.05 if bucket <= kk else 0.95
      assert abs(rate - want) < 0.005, (kk, bucket, rate)


def test_tied_to_t_law():
  np.testing.assert_array_equal(np.asarray(trims_masks.k_from_t(jnp.array([0.99, 0.6, 0.3, 0.05, 1e-3]), 8)),
                                (0, 3, 5, 7, 7))
  keys = jax.random.split(jax.random.key(5), 512)
  _, k, t = _trims_batch(keys, jnp.asarray(_random_buckets(0)), K=8, k_law="tied_to_t")
  t = np.asarray(t)
  assert t.min() >= 1e-3 and t.max() < 1.0
  np.testing.assert_array_equal(np.asarray(k), np.minimum(7, np.floor((1 - t) * 8)).astype(np.int32))


def test_standard_mask_rate_follows_t():
  """The control arms' masking (MDLM.corrupt, the production path): never the prompt, each
  maskable slot masked with probability t, with t per example or stratified over the batch."""
  buckets = np.ones((512, 40), np.int8)
  buckets[:, :10] = 0  # a prompt
  for law in ("example", "stratified"):
    mask, t = _standard_corrupt(buckets, 2, time_sampling=law)
    assert not mask[:, :10].any()
    assert t.min() >= 1e-3 and t.max() < 1.0
    # Masked fraction per example ~ t (binomial noise over 30 slots).
    assert np.corrcoef(mask[:, 10:].mean(1), t)[0, 1] > 0.9
    assert mask[:, 10:].mean() == pytest.approx(t.mean(), abs=0.02)
  # Stratified: exactly one t per stratum of the global batch (spec O6 property).
  strata = np.floor((t - 1e-3) / (1 - 1e-3) * 512).astype(int)
  np.testing.assert_array_equal(np.sort(strata), np.arange(512))


def test_example_keys_independent_of_batch_order():
  base = jax.random.key(42)
  ids = jnp.arange(1000, 1512, dtype=jnp.int32)
  buckets = jnp.asarray(_random_buckets(4))
  step_key = jax.random.fold_in(base, jnp.int32(7))
  m1, k1, _ = _trims_batch(keys_lib.example_keys(step_key, ids), buckets, K=8)
  m2, k2, _ = _trims_batch(keys_lib.example_keys(step_key, ids[::-1]), buckets[::-1], K=8)
  np.testing.assert_array_equal(np.asarray(m2), np.asarray(m1)[::-1])
  np.testing.assert_array_equal(np.asarray(k2), np.asarray(k1)[::-1])
  perm = np.random.default_rng(0).permutation(512)
  m3, _, _ = _trims_batch(keys_lib.example_keys(step_key, ids[perm]), buckets[perm], K=8)
  np.testing.assert_array_equal(np.asarray(m3), np.asarray(m1)[perm])
  # Another step: different masks.
  m4, _, _ = _trims_batch(keys_lib.example_keys(jax.random.fold_in(base, 8), ids), buckets, K=8)
  assert not np.array_equal(np.asarray(m4), np.asarray(m1))
  # Raw uint32 keys work too, and the key equals fold_in(fold_in(base, step), id).
  raw = keys_lib.example_keys(jax.random.fold_in(jax.random.PRNGKey(42), 7), ids[:2])
  np.testing.assert_array_equal(np.asarray(raw[0]),
                                np.asarray(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(42), 7), 1000)))


def test_masking_for_names():
  assert trims_masks.masking_for("random").law == "standard" and trims_masks.masking_for("random").bucket_order is None
  assert trims_masks.masking_for("standard") == trims_masks.masking_for("random")
  assert trims_masks.masking_for("trims").bucket_order == "hard_first"
  assert trims_masks.masking_for("trims_easy_first").bucket_order == "easy_first"
  assert trims_masks.masking_for("random_buckets").bucket_order == "random"
  assert all(trims_masks.masking_for(n).law == "trims" for n in ("trims", "trims_easy_first", "random_buckets"))
  with pytest.raises(ValueError, match="random_buckets"):
    trims_masks.masking_for("trims_hard")


# ------------------------------------------------------------------------------------------------ loss


def _loss_case():
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(3, 6, 7)), jnp.bfloat16)
  targets = jnp.asarray(rng.integers(0, 6, size=(3, 6)))
  mask = jnp.asarray([[1, 0, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
  valid = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
  t = jnp.asarray([0.5, 0.25, 0.8])
  # CE with the [MASK] column (id 6, never a target) left out of the softmax (SUBS).
  lp = jax.nn.log_softmax(np.asarray(logits, np.float32)[..., :6], -1)
  ce = -np.take_along_axis(np.asarray(lp), np.asarray(targets)[..., None], -1)[..., 0] * np.asarray(mask)
  return logits, targets, mask, valid, t, ce


def test_sft_loss_reductions():
  """Uniform weighting (TRIMS): token = masked-slot mean over the batch, sequence = mean of per-row
  masked means; the 1/t-weighted forms are the MDLM NELBO (`mdlm_loss`), checked against it."""
  from dlm_jax.diffusion import masked, schedules  # pylint: disable=g-import-not-at-top
  logits, targets, mask, valid, t, ce = _loss_case()
  tt = np.asarray(t)
  cs = ce.sum(1)
  for n, want in (("token", cs.sum() / 6), ("sequence", np.mean([cs[0] / 2, cs[1] / 4, 0.0]))):
    loss, aux = trims_loss.sft_loss(logits, targets, mask, mask_id=6, normalize=n)
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(want, rel=1e-5), n
    assert float(aux["num_masked"]) == 6 and float(aux["ce_sum"]) == pytest.approx(cs.sum(), rel=1e-5)
  for n, want in (("token", (cs / tt).sum() / 12),
                  ("sequence", np.mean([cs[0] / tt[0] / 4, cs[1] / tt[1] / 6, 0.0]))):
    loss, _ = masked.mdlm_loss(logits, targets, mask, t, schedules.LogLinearSchedule(), valid, 6, n)
    assert float(loss) == pytest.approx(want, rel=1e-5), n


def test_sft_loss_mask_id_and_empty_mask():
  logits, targets, mask, valid, t, _ = _loss_case()
  loss0, _ = trims_loss.sft_loss(logits, targets, jnp.zeros_like(mask), 6, normalize="sequence")
  assert float(loss0) == 0.0
  # The [MASK] column (id 6, never a target here) is left out of the softmax, which lowers the
  # CE compared with keeping it.
  lb, _ = trims_loss.sft_loss(logits, targets, mask, mask_id=6)
  lp = jax.nn.log_softmax(np.asarray(logits, np.float32), -1)
  keep = -np.take_along_axis(np.asarray(lp), np.asarray(targets)[..., None], -1)[..., 0]
  with_mask_col = float((keep * np.asarray(mask)).sum() / 6)
  assert np.isfinite(float(lb)) and float(lb) < with_mask_col
  g = jax.grad(lambda f: trims_loss.sft_loss(f, targets, mask, mask_id=6)[0])(logits.astype(jnp.float32))
  assert np.isfinite(np.asarray(g)).all()


# ------------------------------------------------------------------------------------------------ teacher


def _bigram_teacher(v=5, seed=0):
  table = jnp.asarray(np.random.default_rng(seed).normal(size=(v, v)), jnp.float32)
  return table, lambda tokens: table[tokens]  # logits at i depend on token i only: causal


def test_teacher_token_nll_uses_previous_position():
  table, fn = _bigram_teacher()
  tokens = jnp.asarray([[0, 3, 1, 4, 2], [2, 2, 0, 1, 3]])
  rmask = jnp.asarray([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]], bool)
  nll = np.asarray(trims_scoring.teacher_token_nll(fn, tokens, rmask))
  lp = np.asarray(jax.nn.log_softmax(table, -1))
  tok = np.asarray(tokens)
  for b in range(2):
    for i in range(5):
      want = -lp[tok[b, i - 1], tok[b, i]] if rmask[b, i] else 0.0
      assert nll[b, i] == pytest.approx(want, rel=1e-5)
  ent = np.asarray(trims_scoring.teacher_token_entropy(fn, tokens, rmask))
  h = -(np.exp(lp) * lp).sum(-1)
  assert ent[0, 3] == pytest.approx(h[tok[0, 2]], rel=1e-5) and ent[0, 1] == 0.0
  scores = np.asarray(trims_scoring.teacher_response_scores(fn, tokens[:, :2], tokens[:, 2:]))
  np.testing.assert_allclose(scores, np.asarray(trims_scoring.teacher_token_nll(fn, tokens, jnp.ones((2, 5), bool)))[:, 2:],
                             rtol=1e-6)


# ------------------------------------------------------------------------------------------------ metrics


def test_aup_oracle(caplog):
  tpf, acc = [1, 2, 3, 4], [80, 79, 76, 70]
  np.testing.assert_allclose(trims_metrics.aup_weight([79, 76], 80), (0.963194, 0.860708), atol=1e-6)
  with caplog.at_level(logging.WARNING):
    assert trims_metrics.aup(tpf, acc, y_max=80) == pytest.approx(228.7993, abs=1e-4)
  assert "dropping 1 point" in caplog.text
  assert trims_metrics.aup(tpf, acc, y_max=82) == pytest.approx(218.4764, abs=1e-4)
  # Order of the points does not matter; a single point is rho * y.
  assert trims_metrics.aup(tpf[::-1], acc[::-1], y_max=80) == pytest.approx(228.7993, abs=1e-4)
  assert trims_metrics.aup([1.0], [50.0], y_max=80) == pytest.approx(50.0)
  with pytest.raises(ValueError):
    trims_metrics.aup([], [], y_max=80)
  with pytest.raises(ValueError, match="y_max"):
    trims_metrics.aup([1.0], [0.0], y_max=0.0)
  assert trims_metrics.aup([1.0, 2.0], [0.5, 0.5], y_max=0.5) == pytest.approx(1.0)  # y_max < 1 is fine



def test_aup_by_hand_on_its_boundaries(caplog):
  """A point exactly y_min_offset below y_1 is kept (>=), one further below is dropped; W is
  capped at 1 above y_max; alpha enters as exp(-alpha (1 - y / y_max))."""
  # Points (1, 50), (2, 45), (4, 44.5), y_max 50: the last is dropped (44.5 < 45).
  w45 = math.exp(-3 * (1 - 45 / 50))
  want = 1 * 50 + (2 - 1) * (45 * w45 + 50) / 2
  with caplog.at_level(logging.WARNING):
    assert trims_metrics.aup([1, 2, 4], [50, 45, 44.5], y_max=50) == pytest.approx(want, rel=1e-12)
  assert "dropping 1 point" in caplog.text
  # A point above y_max weighs 1, not more: (1, 40), (3, 60), y_max 50.
  assert trims_metrics.aup([1, 3], [40, 60], y_max=50) == pytest.approx(
      40 + 2 * (60 + 40 * math.exp(-3 * 0.2)) / 2, rel=1e-12)
  # alpha = 1 and a wider offset keep and weigh all three points.
  got = trims_metrics.aup([1, 2, 4], [50, 45, 44.5], y_max=50, alpha=1.0, y_min_offset=6.0)
  wa = [math.exp(-(1 - y / 50)) for y in (50, 45, 44.5)]
  assert got == pytest.approx(50 + (45 * wa[1] + 50 * wa[0]) / 2
                              + 2 * (44.5 * wa[2] + 45 * wa[1]) / 2, rel=1e-12)


def test_reveal_rank_correlation():
  bucket = np.array([[1, 2, 3, 4, 0], [1, 2, 3, 4, 0], [1, 1, 2, 2, 0], [3, 1, 2, 4, 0]])
  hard_first = np.array([0, 1, 2, 3, 9])
  rows = np.stack([hard_first, hard_first[[3, 2, 1, 0, 4]], np.zeros(5), hard_first])
  # Rows: +1, -1, (constant passes: left out), spearman((0,1,2,3), (3,1,2,4)) = 0.4.
  assert trims_metrics.reveal_rank_correlation(rows, bucket) == pytest.approx((1 - 1 + 0.4) / 3)
  assert trims_metrics.reveal_rank_correlation(rows[:1], bucket[:1]) == pytest.approx(1.0)
  assert math.isnan(trims_metrics.reveal_rank_correlation(rows[2:3], bucket[2:3]))
  # An explicit `valid` replaces bucket > 0: dropping slot 0 of row 3 leaves passes (1, 2, 3)
  # against buckets (1, 2, 4): +1; keeping slot 4 (bucket 0, pass 9) of row 0 gives
  # spearman((0,1,2,3,9), (1,2,3,4,0)) = 0.
  valid = bucket > 0
  valid[3, 0] = False
  assert trims_metrics.reveal_rank_correlation(rows[3:], bucket[3:], valid[3:]) == pytest.approx(1.0)
  assert trims_metrics.reveal_rank_correlation(rows[:1], bucket[:1], np.ones((1, 5), bool)) == pytest.approx(0.0)
  assert metrics_lib.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
