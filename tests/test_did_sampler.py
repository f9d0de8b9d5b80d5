"""Oracles for the DID tau-leaping sampler (spec/did.md, "Sampler")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.methods.did import dp as did_dp
from dlm_jax.methods.did import sampler as did_sampling
from dlm_jax.methods.did.sampler import apply_insertions, did_sample, draw_dtype

BOS, A, B, C, D = 0, 1, 2, 3, 4
V = 5
BIG = 10.0  # log-score whose kappa * s exceeds 1: "no insertion" weight clipped to 0, deterministic draw


def exact_ab_scores(tokens, lengths, t):
  """Bayes-optimal scores for the data set {ab}: the DP targets rho with x0 = ab."""
  b = tokens.shape[0]
  x0 = jnp.broadcast_to(jnp.asarray([A, B], jnp.int32), (b, 2))
  return did_dp.log_insertion_targets(x0, jnp.full((b,), 2), tokens[:, 1:], lengths - 1, V)


def test_data_ab_two_steps_gives_ab():
  tokens, lengths, nfe, dropped = did_sample(exact_ab_scores, jax.random.key(0), 256, 2, 2, BOS)
  np.testing.assert_array_equal(lengths, 2)
  np.testing.assert_array_equal(tokens, np.tile([A, B], (256, 1)))
  np.testing.assert_array_equal(nfe, 2)
  np.testing.assert_array_equal(dropped, 0)


def test_data_ab_one_step_gives_a_or_b():
  tokens, lengths, _, _ = did_sample(exact_ab_scores, jax.random.key(1), 256, 1, 2, BOS)
  np.testing.assert_array_equal(lengths, 1)
  tok = np.asarray(tokens)
  assert np.all(tok[:, 1] == -1) and set(tok[:, 0].tolist()) == {A, B}
  frac_a = np.mean(tok[:, 0] == A)
  assert abs(frac_a - 0.5) < 0.125  # 4 binomial standard deviations (n = 256)


def test_float64_draws_when_x64_enabled():
  assert draw_dtype() == (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  with jax.enable_x64(True):
    assert draw_dtype() == jnp.float64
    tokens, lengths, _, _ = did_sample(exact_ab_scores, jax.random.key(2), 64, 2, 2, BOS, kappa_last=1.001)
    np.testing.assert_array_equal(tokens, np.tile([A, B], (64, 1)))


def test_apply_insertions_index_scatter():
  # [BOS, a, b] + c after BOS and d after b -> [BOS, c, a, b, d].
  tokens = jnp.asarray([[BOS, A, B, -1, -1, -1]], jnp.int32)
  insert = jnp.asarray([[True, False, True, True, True, False]])  # rows >= length are ignored
  ids = jnp.asarray([[C, 0, D, A, A, A]], jnp.int32)
  out, lengths, dropped = apply_insertions(tokens, jnp.asarray([3]), insert, ids, pad_value=-1)
  np.testing.assert_array_equal(out, [[BOS, C, A, B, D, -1]])
  assert int(lengths[0]) == 5 and int(dropped[0]) == 0
  # Only one slot left: the first insertion (row order) is kept, the second is dropped and counted.
  out, lengths, dropped = apply_insertions(tokens[:, :4], jnp.asarray([3]), insert[:, :4], ids[:, :4], -1)
  np.testing.assert_array_equal(out, [[BOS, C, A, B]])
  assert int(lengths[0]) == 4 and int(dropped[0]) == 1


def scripted(rules):
  """score_fn inserting rules[length][row] (a token id) deterministically; no mass elsewhere."""
  def score_fn(tokens, lengths, t):
    b, r = tokens.shape
    table = np.full((r + 1, r, V), -np.inf, np.float32)
    for length, rows in rules.items():
      for row, tok in rows.items():
        table[length, row, tok] = BIG
    return jnp.asarray(table)[lengths]
  return score_fn


def test_sampler_index_scatter_scripted():
  # [BOS] -> [BOS, a] -> [BOS, a, b] -> [BOS, c, a, b, d].
  fn = scripted({1: {0: A}, 2: {1: B}, 3: {0: C, 2: D}})
  tokens, lengths, nfe, dropped = did_sample(fn, jax.random.key(3), 2, 3, 6, BOS)
  np.testing.assert_array_equal(tokens, np.tile([C, A, B, D, -1, -1], (2, 1)))
  np.testing.assert_array_equal(lengths, 4)
  np.testing.assert_array_equal(dropped, 0)


def test_capacity_overflow_counted():
  # Insert after every token at every step: lengths 1 -> 2 -> 4 -> 8 (capacity 4 + BOS = 5 slots).
  every = {length: {row: C for row in range(length)} for length in range(1, 6)}
  tokens, lengths, _, dropped = did_sample(scripted(every), jax.random.key(4), 1, 3, 4, BOS)
  # Step 3 has 4 insertions and room for 1: the first (after BOS) is kept, 3 are dropped.
  np.testing.assert_array_equal(lengths, [4])
  np.testing.assert_array_equal(dropped, [3])
  np.testing.assert_array_equal(tokens, [[C, C, C, C]])
  # A fourth step has no room at all: 5 more insertions dropped.
  _, lengths, _, dropped = did_sample(scripted(every), jax.random.key(4), 1, 4, 4, BOS)
  np.testing.assert_array_equal(lengths, [4])
  np.testing.assert_array_equal(dropped, [8])


def test_prompt_gaps_closed():
  every = {length: {row: C for row in range(length)} for length in range(1, 8)}
  prompt = jnp.asarray([[A, B, A], [B, B, 0]], jnp.int32)
  tokens, lengths, _, _ = did_sample(scripted(every), jax.random.key(5), 2, 1, 6, BOS, prompt=prompt,
                                     prompt_len=jnp.asarray([3, 2]))
  # Only the gap after the last prompt token is open on the first step.
  np.testing.assert_array_equal(tokens, [[A, B, A, C, -1, -1], [B, B, C, -1, -1, -1]])
  np.testing.assert_array_equal(lengths, [4, 3])
  # Second step: rows after the prompt (and the inserted token) are open, prompt interior still closed.
  tokens, lengths, _, _ = did_sample(scripted(every), jax.random.key(5), 2, 2, 6, BOS, prompt=prompt,
                                     prompt_len=jnp.asarray([3, 2]))
  np.testing.assert_array_equal(tokens, [[A, B, A, C, C, C], [B, B, C, C, C, -1]])


def test_cache_counts_nfe_per_sample():
  # Sample grows while its length < 3, then stops: with T = 5 the model runs at steps 0, 1, 2 only.
  fn = scripted({1: {0: A}, 2: {0: B}})
  tokens, lengths, nfe, _ = did_sample(fn, jax.random.key(6), 3, 5, 4, BOS, use_cache=True)
  np.testing.assert_array_equal(nfe, 3)
  np.testing.assert_array_equal(tokens, np.tile([B, A, -1, -1], (3, 1)))
  _, _, nfe, _ = did_sample(fn, jax.random.key(6), 3, 5, 4, BOS, use_cache=False)
  np.testing.assert_array_equal(nfe, 5)


def test_score_fn_shape_checked():
  with pytest.raises(ValueError, match="capacity"):
    did_sample(lambda tok, lens, t: jnp.zeros((tok.shape[0], 2, V)), jax.random.key(7), 1, 1, 4, BOS)
  with pytest.raises(ValueError, match="num_steps"):
    did_sample(exact_ab_scores, jax.random.key(7), 1, 0, 2, BOS)
  assert did_sampling.__doc__ and "float64" in did_sampling.__doc__
