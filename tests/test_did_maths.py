"""Oracles for the DID maths (spec/did.md): DP tables, targets, losses, heads, E-NELBO, float32 stress."""

import itertools
import math
import time
from fractions import Fraction as Fr

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from dlm_jax.methods.did import dp as did_dp, heads as did_heads, loss as did_loss, noise as did_noise, oracles as did_oracles

BOS, A, B, C = 0, 1, 2, 3
V = 4
SYM = {"a": A, "b": B, "c": C}


def ids(s):
  return [SYM[ch] for ch in s]


def batch(pairs, n_pad=None, m_pad=None):
  """[(x0 str, xt str)] -> padded (x0, x0_len, xt, xt_len) int32 arrays."""
  n_pad = n_pad or max(1, max(len(x) for x, _ in pairs))
  m_pad = m_pad if m_pad is not None else max(len(y) for _, y in pairs)
  x0 = np.zeros((len(pairs), n_pad), np.int32)
  xt = np.zeros((len(pairs), m_pad), np.int32)
  for i, (x, y) in enumerate(pairs):
    x0[i, :len(x)] = ids(x)
    xt[i, :len(y)] = ids(y)
  return (jnp.asarray(x0), jnp.asarray([len(x) for x, _ in pairs], jnp.int32), jnp.asarray(xt),
          jnp.asarray([len(y) for _, y in pairs], jnp.int32))


_weights_jit = jax.jit(did_dp.log_insertion_weights, static_argnums=4)
_targets_jit = jax.jit(did_dp.log_insertion_targets, static_argnums=4)


def weights(x0, xt, renormalize=True):
  """(N, W [n, m+1]) computed on a fixed padded shape [1, 6] x [1, 4] (one compile for all oracles)."""
  log_n, log_w = _weights_jit(*batch([(x0, xt)], n_pad=6, m_pad=4), renormalize)
  w = np.exp(np.asarray(log_w[0], np.float64))
  assert np.all(w[len(x0):] == 0) and np.all(w[:, len(xt) + 1:] == 0)
  return float(np.exp(log_n[0])), w[:len(x0), :len(xt) + 1]


def rho(x0, xt):
  r = np.exp(np.asarray(_targets_jit(*batch([(x0, xt)], n_pad=6, m_pad=4), V)[0], np.float64))
  assert np.all(r[len(xt) + 1:] == 0)
  return r[:len(xt) + 1]


# ------------------------------------------------------------------------------------------------ oracles A..J


def rho_table(m, entries):
  out = np.zeros((m + 1, V))
  for (g, v), val in entries.items():
    out[g, SYM[v]] = float(val)
  return out


ORACLES = {
    "A": ("abab", "ab", 3, rho_table(2, {(g, v): Fr(1, 3) for g in range(3) for v in "ab"})),
    "B": ("abab", "b", 2, rho_table(1, {(0, "a"): 1.5, (0, "b"): .5, (1, "a"): .5, (1, "b"): .5})),
    "C": ("aaaa", "aa", 6, rho_table(2, {(g, "a"): Fr(2, 3) for g in range(3)})),
    "D": ("abba", "aa", 1, rho_table(2, {(1, "b"): 2})),
    "E": ("abcab", "ab", 3, rho_table(2, {(g, v): Fr(1, 3) for g in range(3) for v in "abc"})),
    "G": ("abcabc", "ac", 3, rho_table(2, {**{(g, v): Fr(1, 3) for g in range(3) for v in "abc"},
                                           (1, "b"): Fr(4, 3)})),
    "H": ("aabba", "ab", 4, rho_table(2, {(0, "a"): .5, (1, "a"): .5, (1, "b"): .5, (2, "a"): 1,
                                          (2, "b"): .5})),
    "I": ("abcba", "bb", 1, rho_table(2, {(0, "a"): 1, (1, "c"): 1, (2, "a"): 1})),
    "J": ("abab", "", 1, rho_table(0, {(0, "a"): 2, (0, "b"): 2})),
    "J2": ("abab", "abab", 1, rho_table(4, {})),
}


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_oracle_counts_and_targets(name):
  x0, xt, count, expected = ORACLES[name]
  n_val, w = weights(x0, xt)
  assert n_val == pytest.approx(count, rel=1e-6)
  got = rho(x0, xt)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert got.sum() == pytest.approx(len(x0) - len(xt), abs=1e-5)
  assert w.sum() == pytest.approx(len(x0) - len(xt), abs=1e-5)
  assert np.all(got[:, BOS] == 0)
  # Exact zeros where rho = 0 (not tiny numbers).
  np.testing.assert_array_equal(got[expected == 0], 0.0)
  # Brute force agrees as well.
  n_bf, rho_bf = did_oracles.brute_force_targets(ids(x0), ids(xt), V)
  assert n_bf == count
  np.testing.assert_allclose(rho_bf, expected, atol=1e-12)


@pytest.mark.parametrize("x0,xt,p_tab,s_tab", [
    ("abab", "ab", [[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 2, 1], [1, 2, 3]],
     [[3, 2, 1], [1, 2, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]]),
    ("aaaa", "aa", [[1, 0, 0], [1, 1, 0], [1, 2, 1], [1, 3, 3], [1, 4, 6]],
     [[6, 4, 1], [3, 3, 1], [1, 2, 1], [0, 1, 1], [0, 0, 1]]),
])
def test_oracle_prefix_suffix_tables(x0, xt, p_tab, s_tab):
  log_p, log_s = did_dp.log_count_tables(*batch([(x0, xt)]))
  np.testing.assert_allclose(np.exp(log_p[0]), p_tab, rtol=1e-6)
  np.testing.assert_allclose(np.exp(log_s[0]), s_tab, rtol=1e-6)
  assert float(np.exp(log_p[0, -1, -1])) == pytest.approx(float(np.exp(log_s[0, 0, 0])))


@pytest.mark.parametrize("x0,xt,w_tab", [
    ("abab", "ab", [[1 / 3, 0, 0], [1 / 3, 1 / 3, 0], [0, 1 / 3, 1 / 3], [0, 0, 1 / 3]]),
    ("abab", "b", [[1, 0], [.5, 0], [.5, .5], [0, .5]]),
    ("aabba", "ab", [[.5, 0, 0], [0, .5, 0], [0, .5, 0], [0, 0, .5], [0, 0, 1]]),
])
@pytest.mark.parametrize("renormalize", [True, False])
def test_oracle_weights(x0, xt, w_tab, renormalize):
  _, w = weights(x0, xt, renormalize)
  np.testing.assert_allclose(w, w_tab, atol=1e-6)
  np.testing.assert_array_equal(w[np.asarray(w_tab) == 0], 0.0)
  if (x0, xt) == ("abab", "ab"):
    np.testing.assert_allclose(w.sum(1), [1 / 3, 2 / 3, 2 / 3, 1 / 3], atol=1e-6)


def test_oracle_action_counts_not_deduplicated():
  # (g=0, a) and (g=1, a) both give "aab" from x_t = "ab"; each keeps rho = 1/3.
  r = rho("abab", "ab")
  assert r[0, A] == pytest.approx(1 / 3) and r[1, A] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------- F layout + losses

F_ROW0 = [-np.inf, 0.4054651, -0.6931472]
F_ROW1 = [-np.inf, -0.6931472, -0.6931472]
F_CONST = -3.4315231


def f_inputs():
  x0 = jnp.asarray([[A, B, A, B]], jnp.int32)
  xt = jnp.asarray([[B]], jnp.int32)
  return x0, jnp.asarray([4]), xt, jnp.asarray([1])


def test_oracle_f_layout():
  tgt = np.asarray(did_dp.log_insertion_targets(*f_inputs(), vocab_size=3))
  assert tgt.shape == (1, 2, 3)
  np.testing.assert_allclose(tgt[0], [F_ROW0, F_ROW1], atol=1e-6)
  r = np.exp(tgt[0].astype(np.float64))
  const = np.sum(np.where(r > 0, r * (np.log(np.where(r > 0, r, 1)) - 1), 0))
  assert const == pytest.approx(F_CONST, abs=1e-6)


def scores(vals):
  return jnp.asarray([vals], jnp.float32)


ZERO_AB = [[-np.inf, 0, 0], [-np.inf, 0, 0]]


@pytest.mark.parametrize("loss_fn", [did_loss.dise_loss, did_loss.dice_loss])
def test_loss_oracles_f(loss_fn):
  inp = f_inputs()

  def loss(vals, t=1.0, mask=None):
    return float(loss_fn(scores(vals), *inp, t, normalize="sum", allowed_mask=mask)[0])

  if loss_fn is did_loss.dise_loss:
    assert loss(ZERO_AB) == pytest.approx(0.5684769, abs=1e-6)
    assert loss(ZERO_AB, t=0.25) == pytest.approx(2.2739076, abs=1e-5)
    # Same through allowed_mask instead of -inf scores.
    assert loss(np.zeros((2, 3)), mask=jnp.asarray([False, True, True])) == pytest.approx(0.5684769, abs=1e-6)
    # Reference layout that also scores the BOS column with out = 0.
    assert loss(np.zeros((2, 3))) == pytest.approx(2.5684769, abs=1e-6)
  # Uniform seqnorm scores s = 3/4 over (rows x allowed): DICE = DISE = 1.5 ln(4/3).
  uni = [[-np.inf, math.log(.75), math.log(.75)]] * 2
  assert loss(uni) == pytest.approx(0.4315231, abs=1e-6)
  # Reference layout over 3 columns, s = 1/2.
  half = [[math.log(.5)] * 3] * 2
  if loss_fn is did_loss.dice_loss:
    assert loss(half) == pytest.approx(1.6479184, abs=1e-6)
  # out = log rho on the support: loss 0.
  assert loss([F_ROW0, F_ROW1]) == pytest.approx(0.0, abs=1e-6)


def test_loss_oracles_a():
  inp = batch([("abab", "ab")])
  zero = np.full((3, V), 0.0)
  zero[:, BOS] = zero[:, C] = -np.inf
  assert float(did_loss.dise_loss(scores(zero), *inp, 1.0, "sum")[0]) == pytest.approx(1.8027754, abs=1e-6)
  uni = np.where(np.isfinite(zero), math.log(2 / 6), -np.inf)
  assert float(did_loss.dice_loss(scores(uni), *inp, 1.0, "sum")[0]) == pytest.approx(0.0, abs=1e-6)
  assert float(did_loss.dise_loss(scores(uni), *inp, 1.0, "sum")[0]) == pytest.approx(0.0, abs=1e-6)


def test_loss_normalizations_and_aux():
  x0, n, xt, m = batch([("abab", "b"), ("abab", "b")])
  ls = jnp.asarray([ZERO_AB, ZERO_AB], jnp.float32)
  t = jnp.asarray([1.0, 0.25])
  total = 0.5684769 * 5
  loss_sum, aux = did_loss.dise_loss(ls, x0, n, xt, m, t, normalize="sum")
  assert float(loss_sum) == pytest.approx(total, abs=1e-5)
  np.testing.assert_allclose(aux["per_seq"], [0.5684769, 2.2739076], atol=1e-5)
  assert int(aux["token_count"]) == 8 and float(aux["nll_sum"]) == pytest.approx(total, abs=1e-5)
  assert float(did_loss.dise_loss(ls, x0, n, xt, m, t, normalize="batch")[0]) == pytest.approx(total / 2, abs=1e-5)
  assert float(did_loss.dise_loss(ls, x0, n, xt, m, t, normalize="token")[0]) == pytest.approx(total / 8, abs=1e-5)
  with pytest.raises(ValueError, match="normalize"):
    did_loss.dise_loss(ls, x0, n, xt, m, t, normalize="mean")


def test_degenerate_cases_finite_loss_and_grads():
  # Example 0: empty x0 (n = 0); example 1: no deletion (xt == x0); example 2: ordinary.
  x0, n, xt, m = batch([("", ""), ("abc", "abc"), ("abab", "b")], n_pad=4, m_pad=4)
  rng = np.random.default_rng(0)
  ls = rng.normal(size=(3, 5, V)).astype(np.float32)
  ls[:, :, BOS] = -np.inf
  ls = jnp.asarray(ls)
  t = jnp.asarray([0.5, 0.5, 0.5])
  valid_rows = np.arange(5)[None, :] <= np.asarray(m)[:, None]
  mass = np.sum(np.where(valid_rows[:, :, None], np.exp(np.asarray(ls, np.float64)), 0), axis=(1, 2))
  for fn in (did_loss.dise_loss, did_loss.dice_loss):
    loss, aux = jax.jit(fn, static_argnames="normalize")(ls, x0, n, xt, m, t, normalize="token")
    per = np.asarray(aux["per_seq"])
    assert np.all(np.isfinite(per)) and np.isfinite(float(loss))
    grad = jax.grad(lambda s: fn(s, x0, n, xt, m, t, "token")[0])(ls)
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[:, :, BOS], 0.0)
    if fn is did_loss.dise_loss:  # documented: rho = 0, loss = w(t) * insertion mass over rows 0..m
      np.testing.assert_allclose(per[:2], 2.0 * mass[:2], rtol=1e-5)
    else:  # documented: exactly 0
      np.testing.assert_array_equal(per[:2], 0.0)
  # All-empty batch: token normaliser clamps at 1, still finite.
  x0, n, xt, m = batch([("", "")], n_pad=2, m_pad=2)
  loss, aux = did_loss.dise_loss(ls[:1, :3], x0, n, xt, m, 1.0)
  assert np.isfinite(float(loss)) and int(aux["token_count"]) == 0


def test_dise_gradient_is_s_minus_rho():
  inp = batch([("abcab", "ab")])
  rng = np.random.default_rng(1)
  ls = jnp.asarray(rng.normal(size=(1, 3, V)), jnp.float32).at[:, :, BOS].set(-jnp.inf)
  grad = jax.grad(lambda s: did_loss.dise_loss(s, *inp, 0.5, "sum")[0])(ls)
  expected = 2.0 * (np.exp(np.asarray(ls)) - rho("abcab", "ab"))
  np.testing.assert_allclose(grad, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------- heads


def test_seqnorm_head():
  rng = np.random.default_rng(2)
  tok = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
  row = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
  valid = jnp.asarray([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], bool)  # second: prompt closes rows 0, 1
  n_missing = jnp.asarray([3.0, 7.0])
  out = np.asarray(did_heads.seqnorm_head(tok, row, valid, n_missing, disallowed_ids=(0, 5)))
  assert np.all(out[:, :, [0, 5]] == -np.inf)
  assert np.all(out[~np.asarray(valid)] == -np.inf)
  np.testing.assert_allclose(np.exp(out.astype(np.float64)).sum((1, 2)), [3 + 1e-4, 7 + 1e-4], rtol=1e-6)
  # Per row, the token distribution is a softmax over allowed columns.
  p = np.exp(out[0, 0]) / np.exp(out[0, 0]).sum()
  allowed = np.asarray(tok[0, 0, 1:5], np.float64)
  np.testing.assert_allclose(p[1:5], np.exp(allowed) / np.exp(allowed).sum(), rtol=1e-5)
  # Uniform logits reproduce the F loss oracle (s = (3 + 1e-4) / 4).
  ls = did_heads.seqnorm_head(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2)), jnp.ones((1, 2), bool), jnp.asarray([3.0]), (BOS,))
  assert float(did_loss.dice_loss(ls, *f_inputs(), 1.0, "sum")[0]) == pytest.approx(0.4315231, abs=2e-4)


def test_count_softmax_head():
  rng = np.random.default_rng(3)
  tok = jnp.asarray(rng.normal(size=(1, 3, 5)), jnp.float32)
  row = jnp.asarray([[0.5, 3.0, -2.0]], jnp.float32)
  out = np.asarray(did_heads.count_softmax_head(tok, row, math.log(4.0), disallowed_ids=[0]))
  assert np.all(out[..., 0] == -np.inf)
  np.testing.assert_allclose(np.exp(out.astype(np.float64)).sum(-1), [[math.exp(.5), 4.0, math.exp(-2)]],
                             rtol=1e-5)
  # Gradient of the DISE through the head is finite.
  inp = batch([("abab", "ab")])
  g = jax.grad(lambda r: did_loss.dise_loss(did_heads.count_softmax_head(jnp.zeros((1, 3, V)), r, 2.0, (0,)),
                                       *inp, 0.3)[0])(row)
  assert np.all(np.isfinite(np.asarray(g)))


# ------------------------------------------------------------------------------------------- properties + brute force

N_MAX = 8
_jit_targets = jax.jit(lambda *a: (did_dp.log_insertion_weights(*a[:4]), did_dp.log_insertion_weights(*a[:4], False),
                                   did_dp.log_insertion_targets(*a, renormalize=True), did_dp.check_subsequence(*a[:4])),
                       static_argnums=4)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 3), min_size=0, max_size=N_MAX), st.data())
def test_dp_matches_brute_force(x0_list, data):
  keep = data.draw(st.lists(st.booleans(), min_size=len(x0_list), max_size=len(x0_list)))
  xt_list = [v for v, k in zip(x0_list, keep) if k]
  x0 = np.zeros((1, N_MAX), np.int32)
  xt = np.zeros((1, N_MAX), np.int32)
  x0[0, :len(x0_list)] = x0_list
  xt[0, :len(xt_list)] = xt_list
  args = (jnp.asarray(x0), jnp.asarray([len(x0_list)]), jnp.asarray(xt), jnp.asarray([len(xt_list)]))
  (log_n, log_w), (log_n_plain, log_w_plain), log_rho, ok = _jit_targets(*args, V)
  count, rho_bf = did_oracles.brute_force_targets(x0_list, xt_list, V)
  assert bool(ok[0])
  assert float(np.exp(log_n[0])) == pytest.approx(count, rel=1e-5)
  m = len(xt_list)
  got = np.exp(np.asarray(log_rho[0], np.float64))
  np.testing.assert_allclose(got[:m + 1], rho_bf, atol=2e-6)
  np.testing.assert_array_equal(got[m + 1:], 0.0)  # gaps past m
  np.testing.assert_array_equal(got[:m + 1][rho_bf == 0], 0.0)  # ids absent / impossible: exact zeros
  w = np.exp(np.asarray(log_w[0], np.float64))
  assert w.sum() == pytest.approx(len(x0_list) - m, abs=1e-5)
  np.testing.assert_array_equal(w[len(x0_list):], 0.0)
  np.testing.assert_allclose(w, np.exp(np.asarray(log_w_plain[0], np.float64)), atol=1e-6)
  log_p, log_s = did_dp.log_count_tables(*args)
  assert float(np.exp(log_p[0, len(x0_list), m])) == pytest.approx(count, rel=1e-5)
  assert float(np.exp(log_s[0, 0, 0])) == pytest.approx(count, rel=1e-5)


def test_padded_equals_unpadded_and_batched_jit():
  pairs = [("abcab", "ab"), ("abab", ""), ("", ""), ("abc", "abc")]
  padded = batch(pairs, n_pad=9, m_pad=7)
  log_n, log_w = jax.jit(did_dp.log_insertion_weights)(*padded)
  log_rho = jax.jit(did_dp.log_insertion_targets, static_argnums=4)(*padded, V)
  for i, (x0, xt) in enumerate(pairs):
    single = batch([(x0, xt)], n_pad=max(1, len(x0)), m_pad=len(xt))
    ln1, lw1 = did_dp.log_insertion_weights(*single)
    lr1 = did_dp.log_insertion_targets(*single, V)
    n, m = len(x0), len(xt)
    np.testing.assert_allclose(log_n[i], ln1[0], atol=1e-6)
    np.testing.assert_allclose(np.exp(log_w[i, :n, :m + 1]), np.exp(lw1[0, :n]), atol=1e-6)
    np.testing.assert_allclose(np.exp(log_rho[i, :m + 1]), np.exp(lr1[0]), atol=1e-6)
    assert np.all(np.asarray(log_w[i, n:]) == -np.inf) and np.all(np.asarray(log_w[i, :, m + 1:]) == -np.inf)
    assert np.all(np.asarray(log_rho[i, m + 1:]) == -np.inf)


def test_compact_targets_match_dense():
  pairs = [("abcab", "ab"), ("aabba", "ab"), ("abab", ""), ("", "")]
  args = batch(pairs, n_pad=6, m_pad=3)
  _, log_w = did_dp.log_insertion_weights(*args)
  rho_c, seg_tok, seg_valid = jax.jit(did_dp.compact_targets)(args[0], args[1], log_w)
  dense = np.exp(np.asarray(did_dp.log_insertion_targets(*args, V), np.float64))
  for i, (x0, _) in enumerate(pairs):
    distinct = sorted(set(ids(x0)))
    assert int(np.sum(seg_valid[i])) == len(distinct)
    assert sorted(np.asarray(seg_tok[i])[np.asarray(seg_valid[i])].tolist()) == distinct
    for s in range(6):
      if seg_valid[i, s]:
        np.testing.assert_allclose(rho_c[i, s], dense[i, :, int(seg_tok[i, s])], atol=1e-6)
      else:
        np.testing.assert_array_equal(rho_c[i, s], 0.0)


def test_check_subsequence_and_validate_inputs():
  good = batch([("abab", "bb"), ("abc", "")], n_pad=4, m_pad=2)
  assert np.all(np.asarray(jax.jit(did_dp.check_subsequence)(*good)))
  did_dp.validate_inputs(*good)
  bad = batch([("abab", "ba"), ("abc", "cb")], n_pad=4, m_pad=2)
  np.testing.assert_array_equal(did_dp.check_subsequence(*bad), [True, False])
  with pytest.raises(ValueError, match="not a subsequence"):
    did_dp.validate_inputs(*bad)
  x0, n, xt, m = good
  with pytest.raises(ValueError, match="xt_len"):
    did_dp.validate_inputs(x0, n, xt, jnp.asarray([2, 3]))
  with pytest.raises(ValueError, match="x0_len"):
    did_dp.validate_inputs(x0, jnp.asarray([5, 3]), xt, m)
  with pytest.raises(ValueError, match="> x0_len"):
    did_dp.validate_inputs(x0, jnp.asarray([1, 3]), xt, m)
  assert not bool(did_dp.check_subsequence(x0, jnp.asarray([1, 3]), xt, m)[0])
  # Not a subsequence: the DP returns logN = -inf and no NaN.
  log_n, log_w = did_dp.log_insertion_weights(*bad)
  assert float(log_n[1]) == -np.inf and not np.any(np.isnan(np.asarray(log_w)))



def test_validate_inputs_names_each_problem():
  """Each check on its own: one wrong rank, each mismatched batch size, each length out of range
  (named with its index and value), xt_len > x0_len (equal is fine)."""
  x0, n, xt, m = batch([("abab", "bb"), ("ab", "ab")], n_pad=4, m_pad=2)
  did_dp.validate_inputs(x0, n, xt, m)
  for args in ((x0, n, xt[0], m), (x0[0], n, xt, m)):
    with pytest.raises(ValueError, match=r"must be \[B, N\]"):
      did_dp.validate_inputs(*args)
  for args in ((x0, n, xt[:1], m), (x0, n[:1], xt, m), (x0, n, xt, m[:1])):
    with pytest.raises(ValueError, match="batch sizes differ"):
      did_dp.validate_inputs(*args)
  with pytest.raises(ValueError, match=r"^x0_len\[1\] = 5 is out of range \[0, 4\]"):
    did_dp.validate_inputs(x0, jnp.asarray([4, 5]), xt, m)
  with pytest.raises(ValueError, match=r"^xt_len\[0\] = 3 is out of range \[0, 2\]"):
    did_dp.validate_inputs(x0, n, xt, jnp.asarray([3, 2]))
  with pytest.raises(ValueError, match=r"^xt_len\[1\] = 2 > x0_len\[1\] = 1: deletion"):
    did_dp.validate_inputs(x0, jnp.asarray([4, 1]), xt, m)

# ------------------------------------------------------------------------------------------------ forward process


def test_schedule_and_forward_delete():
  assert float(did_noise.survival(0.25)) == pytest.approx(0.75)
  assert float(did_noise.survival(1.0, eps=1e-3)) == pytest.approx(1e-3, rel=1e-4)
  assert float(did_noise.loss_weight(0.25)) == pytest.approx(4.0)
  rng = np.random.default_rng(4)
  bsz, n = 256, 32
  x0 = jnp.asarray(rng.integers(1, 9, size=(bsz, n)), jnp.int32)
  x0_len = jnp.asarray(rng.integers(0, n + 1, size=bsz), jnp.int32)
  t = jnp.asarray(rng.uniform(size=bsz), jnp.float32)
  fd = jax.jit(did_noise.forward_delete, static_argnames="pad_value")
  xt, xt_len = fd(jax.random.key(0), x0, x0_len, t, pad_value=-7)
  assert xt.shape == (bsz, n) and xt.dtype == jnp.int32
  assert np.all(np.asarray(did_dp.check_subsequence(x0, x0_len, xt, xt_len)))
  assert np.all(np.asarray(xt)[np.arange(n)[None] >= np.asarray(xt_len)[:, None]] == -7)
  # Kept fraction matches alpha(t): sum(m) vs sum(n alpha) within 5 sigma.
  alpha = 1 - np.asarray(t)
  mean, var = np.sum(np.asarray(x0_len) * alpha), np.sum(np.asarray(x0_len) * alpha * (1 - alpha))
  assert abs(int(np.sum(xt_len)) - mean) < 5 * math.sqrt(var) + 1
  # Per-example keys: example b depends on its own key only (permuting the batch permutes the output).
  keys = jax.random.split(jax.random.key(1), bsz)
  perm = rng.permutation(bsz)
  xt_a, len_a = did_noise.forward_delete(keys, x0, x0_len, t)
  xt_b, len_b = did_noise.forward_delete(keys[perm], x0[perm], x0_len[perm], t[perm])
  np.testing.assert_array_equal(np.asarray(xt_a)[perm], xt_b)
  np.testing.assert_array_equal(np.asarray(len_a)[perm], len_b)
  raw = jax.random.split(jax.random.PRNGKey(1), bsz)  # raw uint32 [B, 2] keys too
  assert did_noise.forward_delete(raw, x0, x0_len, t)[0].shape == (bsz, n)
  # t = 0 keeps everything; t = 1 with eps = 0 deletes everything.
  xt0, len0 = did_noise.forward_delete(jax.random.key(2), x0, x0_len, 0.0)
  np.testing.assert_array_equal(len0, x0_len)
  assert np.all((np.asarray(xt0) == np.asarray(x0))[np.arange(n)[None] < np.asarray(x0_len)[:, None]])
  assert int(np.sum(did_noise.forward_delete(jax.random.key(3), x0, x0_len, 1.0)[1])) == 0


# ------------------------------------------------------------------------------------------ E-NELBO (Bayes-optimal)


def exact_nelbo_fixed(data):
  """NELBO(x0) for each x0 of a fixed-length dataset with the Bayes-optimal (time-free) score, via dice_loss.

  NELBO(x0) = sum_{k=1..n} (1/k) E_{k uniform deletions}[DICE with w = 1].
  """
  seqs = [ids(y) for y in data]
  probs = np.asarray(list(data.values()), np.float64)
  n = len(seqs[0])
  rows, coef = [], []
  for i, x0 in enumerate(seqs):
    for k in range(1, n + 1):
      subsets = list(itertools.combinations(range(n), k))
      for dele in subsets:
        xt = [v for j, v in enumerate(x0) if j not in dele]
        num = np.zeros((n, V))  # rows g = 0..m, padded to M + 1 = n rows
        den = sum(p * did_oracles.brute_force_count(xt, y) for p, y in zip(probs, seqs))
        for g in range(len(xt) + 1):
          for v in range(1, V):
            num[g, v] = sum(p * did_oracles.brute_force_count(xt[:g] + [v] + xt[g:], y) for p, y in zip(probs, seqs))
        rows.append((x0, xt, np.log(np.where(num > 0, num / den, 1.0)) + np.where(num > 0, 0, -np.inf)))
        coef.append((i, 1.0 / k / len(subsets)))
  m_pad = n - 1
  x0 = jnp.asarray([r[0] for r in rows], jnp.int32)
  xt = jnp.asarray([r[1] + [0] * (m_pad - len(r[1])) for r in rows], jnp.int32)
  ls = jnp.asarray(np.stack([r[2] for r in rows]), jnp.float32)
  per = np.asarray(did_loss.dice_loss(ls, x0, jnp.full((len(rows),), n), xt,
                                 jnp.asarray([len(r[1]) for r in rows]), 1.0, "sum")[1]["per_seq"])
  out = np.zeros(len(seqs))
  for (i, c), val in zip(coef, per):
    out[i] += c * val
  return out


@pytest.mark.parametrize("data,expected", [
    ({"ab": .5, "ba": .5}, [0.6931472, 0.6931472]),
    ({"ab": .5, "ba": .25, "aa": .25}, [0.6931472, 1.3862944, 1.3862944]),
    ({"abc": .25, "acb": .25, "bac": .25, "aab": .25}, [1.3862944] * 4),
])
def test_e_nelbo_fixed_length(data, expected):
  nelbo = exact_nelbo_fixed(data)
  np.testing.assert_allclose(nelbo, expected, atol=1e-5)
  np.testing.assert_allclose(nelbo, -np.log(list(data.values())), atol=1e-5)  # the bound is exact


def test_e_nelbo_variable_length():
  """Data {a: 1/2, ab: 1/4, ba: 1/4}; time-dependent optimal score; t = u^2, 400 Gauss-Legendre nodes."""
  data = {"a": .5, "ab": .25, "ba": .25}
  seqs = {y: ids(y) for y in data}
  u, wq = np.polynomial.legendre.leggauss(400)
  u, wq = (u + 1) / 2, wq / 2
  t = u ** 2
  x0_rows, xt_rows, ls_rows, t_rows, coef, owner, lens0, lens_t = [], [], [], [], [], [], [], []
  for name, x0 in seqs.items():
    n = len(x0)
    for keep in itertools.product([0, 1], repeat=n):
      xt = [v for v, k in zip(x0, keep) if k]
      m = len(xt)
      # Optimal score: sum_y p(y) t^|y| C_y / sum_y p(y) t^|y| N(xt, y)   (1 - alpha = t).
      num = np.zeros((len(t), 3, V))
      den = np.zeros(len(t))
      for y, p in data.items():
        yy = seqs[y]
        den += p * t ** len(yy) * did_oracles.brute_force_count(xt, yy)
        for g in range(m + 1):
          for v in range(1, V):
            num[:, g, v] += p * t ** len(yy) * did_oracles.brute_force_count(xt[:g] + [v] + xt[g:], yy)
      s = num / den[:, None, None]
      ls_rows.append(np.where(s > 0, np.log(np.where(s > 0, s, 1)), -np.inf))
      x0_rows.append(np.tile(x0 + [0] * (2 - n), (len(t), 1)))
      xt_rows.append(np.tile(xt + [0] * (2 - m), (len(t), 1)))
      t_rows.append(t)
      q = (1 - t) ** m * t ** (n - m)
      coef.append(wq * 2 * u * q)
      owner.append(np.full(len(t), list(data).index(name)))
      lens0.append(np.full(len(t), n))
      lens_t.append(np.full(len(t), m))
  per = did_loss.dise_loss(jnp.asarray(np.concatenate(ls_rows), jnp.float32), jnp.asarray(np.concatenate(x0_rows)),
                      jnp.asarray(np.concatenate(lens0)), jnp.asarray(np.concatenate(xt_rows)),
                      jnp.asarray(np.concatenate(lens_t)),
                      jnp.asarray(np.concatenate(t_rows), jnp.float32), "sum")[1]["per_seq"]
  nelbo = np.bincount(np.concatenate(owner), weights=np.concatenate(coef) * np.asarray(per, np.float64))
  np.testing.assert_allclose(nelbo, [0.6931472, 1.3862944, 1.3862944], atol=1e-4)


# ------------------------------------------------------------------------------------------------ float32 stress


def test_float32_stress_renormalisation():
  n, m = 1024, 512
  x0 = jnp.full((1, n), A, jnp.int32)
  xt = jnp.full((1, m), A, jnp.int32)
  args = (x0, jnp.asarray([n]), xt, jnp.asarray([m]))
  log_n, log_w = jax.jit(did_dp.log_insertion_weights)(*args)
  exact = math.lgamma(n + 1) - 2 * math.lgamma(m + 1)
  assert exact == pytest.approx(706.0909, abs=1e-4)
  assert float(log_n[0]) == pytest.approx(exact, abs=1e-2)
  total = float(np.sum(np.exp(np.asarray(log_w, np.float64))))
  assert abs(total - (n - m)) / (n - m) < 1e-3
  # Every slot has deletion probability 1/2 by symmetry.
  per_slot = np.exp(np.asarray(log_w[0], np.float64)).sum(1)
  np.testing.assert_allclose(per_slot, 0.5, rtol=2e-3)


def test_memory_sanity_batch8_1024():
  bsz, n = 8, 1024
  rng = np.random.default_rng(5)
  x0 = jnp.asarray(rng.integers(1, 50, size=(bsz, n)), jnp.int32)
  x0_len = jnp.full((bsz,), n, jnp.int32)
  start = time.time()
  xt, xt_len = did_noise.forward_delete(jax.random.key(0), x0, x0_len, jnp.linspace(0.05, 0.6, bsz))
  xt_len = xt_len.at[0].set(n)
  xt = xt.at[0].set(x0[0])  # one example with m = n
  fn = jax.jit(did_dp.log_insertion_weights)
  compiled = fn.lower(x0, x0_len, xt, xt_len).compile()
  log_n, log_w = compiled(x0, x0_len, xt, xt_len)
  assert log_w.shape == (bsz, n, n + 1)
  sums = np.exp(np.asarray(log_w, np.float64)).sum((1, 2))
  np.testing.assert_allclose(sums, np.asarray(x0_len - xt_len), rtol=1e-3, atol=1e-3)
  mem = compiled.memory_analysis()
  if mem is not None and getattr(mem, "temp_size_in_bytes", None):
    assert mem.temp_size_in_bytes < 1 << 30  # a few [B, N, M+1] float32 buffers (~34 MB each)
  assert time.time() - start < 120
