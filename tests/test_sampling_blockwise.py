"""Blockwise semi-AR decoding: oracles O9 (fixed-k) and O10 (threshold), metrics, invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.sampling import blockwise
from dlm_jax.metrics import bits_per_token, content_length, perplexity_bound, tokens_per_forward
from dlm_jax.metrics import wilson_interval
from dlm_jax.sampling.common import DecodeResult

MASK = 0
K = 16  # non-mask ids 1..K
EOS = 15


def scripted_logits(conf, yhat):
  """Logits [..., K + 1] whose SUBS softmax puts probability conf on yhat (ids 1..K)."""
  conf = np.asarray(conf, np.float64)
  yhat = np.asarray(yhat)
  out = np.repeat(np.log((1.0 - conf) / (K - 1))[..., None], K + 1, axis=-1)
  np.put_along_axis(out, yhat[..., None], np.log(conf)[..., None], axis=-1)
  out[..., MASK] = 9.0  # SUBS ignores the mask column
  return out.astype(np.float32)


def test_num_transfer_tokens():
  n = blockwise.num_transfer_tokens(jnp.array([32, 4, 3]), 5)
  np.testing.assert_array_equal(np.asarray(n), [[7, 7, 6, 6, 6], [1, 1, 1, 1, 0],
                                                [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(np.asarray(n).sum(axis=1), [32, 4, 3])


def positional_model(prompt_len, gen_len, order):
  """Confidence depends only on the generated slot; `order` lists slots most confident first."""
  conf = np.zeros(gen_len)
  conf[np.asarray(order)] = np.linspace(0.8, 0.2, gen_len)
  yhat = 1 + np.arange(gen_len) % K
  gl = jnp.asarray(scripted_logits(conf, yhat))

  def fn(tokens):
    b = tokens.shape[0]
    return jnp.concatenate([jnp.zeros((b, prompt_len, K + 1)), jnp.broadcast_to(
        gl, (b,) + gl.shape)], axis=1)
  return fn


def test_fixed_k_o9():
  order = [3, 1, 0, 2, 6, 7, 5, 4]
  fn = positional_model(2, 8, order)
  prompt = jnp.full((2, 2), 5, jnp.int32)
  res = jax.jit(lambda p: blockwise.decode_fixed_k(fn, p, 8, 4, 4, MASK))(prompt)
  assert isinstance(res, DecodeResult)
  np.testing.assert_array_equal(np.asarray(res.nfe), [4, 4])
  # Two passes of 2 per block, most confident first within the active block only.
  np.testing.assert_array_equal(np.asarray(res.commit_step[0]), [1, 0, 1, 0, 3, 3, 2, 2])
  np.testing.assert_array_equal(np.asarray(res.tokens[0, 2:]), 1 + np.arange(8))
  np.testing.assert_array_equal(np.asarray(res.commit_rule), 0)
  # steps must split evenly over blocks; gen_len a multiple of block_len.
  with pytest.raises(ValueError, match="steps"):
    blockwise.decode_fixed_k(fn, prompt, 8, 4, 3, MASK)
  with pytest.raises(ValueError, match="block_len"):
    blockwise.decode_fixed_k(fn, prompt, 10, 4, 4, MASK)


def o10_model(prompt_len):
  """Scripted O10 model: the pass is recognised by the number of committed generated slots."""
  hi = [0.99, 0.97, 0.95, 0.91]
  y = [1, 2, 3, 4, 5, 6, EOS, 7]
  passes = {  # committed count -> confidences of slots 0..7
      0: [0.95, 0.40, 0.92, 0.30] + hi,
      2: [0.5, 0.50, 0.5, 0.60] + hi,
      3: [0.5, 0.20, 0.5, 0.5] + hi,
      4: [0.5, 0.5, 0.5, 0.5] + hi,
  }
  table = np.full((9,), -1)
  conf = []
  for i, (n, c) in enumerate(sorted(passes.items())):
    table[n] = i
    conf.append(c)
  gl = jnp.asarray(scripted_logits(np.array(conf), np.broadcast_to(y, (4, 8))))
  table = jnp.asarray(table)

  def fn(tokens):
    n = jnp.sum(tokens[:, prompt_len:] != MASK, axis=-1)
    row = table[n]
    out = jnp.where((row >= 0)[:, None, None], gl[jnp.maximum(row, 0)], jnp.nan)
    return jnp.concatenate([jnp.zeros((tokens.shape[0], prompt_len, K + 1)), out], axis=1)
  return fn


def test_threshold_o10():
  fn = o10_model(3)
  prompt = jnp.array([[4, 5, 6]], jnp.int32)
  res = jax.jit(lambda p: blockwise.decode_threshold(fn, p, 8, 4, 0.9, mask_id=MASK))(prompt)
  assert int(res.nfe[0]) == 4
  np.testing.assert_array_equal(np.asarray(res.commit_step[0]), [0, 2, 0, 1, 3, 3, 3, 3])
  np.testing.assert_array_equal(np.asarray(res.tokens[0]), [4, 5, 6, 1, 2, 3, 4, 5, 6, EOS, 7])
  np.testing.assert_allclose(np.asarray(res.commit_conf[0]),
                             [0.95, 0.20, 0.92, 0.60, 0.99, 0.97, 0.95, 0.91], atol=1e-5)
  gen = res.tokens[:, 3:]
  tpf_gen = tokens_per_forward(jnp.full((1,), 8), res.nfe)
  tpf_content = tokens_per_forward(content_length(gen, EOS), res.nfe)
  assert float(tpf_gen) == pytest.approx(2.0)
  assert int(content_length(gen, EOS)[0]) == 6
  assert float(tpf_content) == pytest.approx(1.5)
  # max_passes caps the decode: committed tokens are the same, the rest stay masked.
  capped = blockwise.decode_threshold(fn, prompt, 8, 4, 0.9, mask_id=MASK, max_passes=2)
  assert int(capped.nfe[0]) == 2
  np.testing.assert_array_equal(np.asarray(capped.tokens[0, 3:]), [1, 0, 3, 4, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(capped.commit_rule[0]), [0, -1, 0, 0, -1, -1, -1, -1])


def test_bad_inputs_raise():
  fn = o10_model(1)
  p = jnp.ones((1, 1), jnp.int32)
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="tau"):
      blockwise.decode_threshold(fn, p, 8, 4, bad, mask_id=MASK)
  with pytest.raises(ValueError, match="multiple of block_len"):
    blockwise.decode_threshold(fn, p, 6, 4, 0.9, mask_id=MASK)
  with pytest.raises(ValueError, match="key"):
    blockwise.decode_threshold(fn, p, 8, 4, 0.9, mask_id=MASK, temperature=1.0)


def tiny_model(vocab=9, seed=0):
  """Deterministic token-dependent logits [B, L, V]; rows independent."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  emb = jax.random.normal(k1, (vocab, 8))
  pos = jax.random.normal(k2, (64, 8))
  out = jax.random.normal(k3, (8, vocab)) * 2.5

  def fn(tokens):
    h = emb[tokens] + pos[: tokens.shape[1]]
    return jnp.tanh(h + jnp.mean(h, axis=1, keepdims=True)) @ out
  return fn


def test_samples_independent_and_prefix_consistent():
  fn = tiny_model()
  prompts = jax.random.randint(jax.random.PRNGKey(1), (4, 3), 1, 9)
  dec = jax.jit(lambda p: blockwise.decode_threshold(fn, p, 8, 4, 0.8, mask_id=MASK))
  batched = dec(prompts)
  nfe = np.asarray(batched.nfe)
  assert (nfe >= 2).all() and (nfe <= 8).all()
  for b in range(4):
    single = dec(prompts[b:b + 1])
    np.testing.assert_array_equal(np.asarray(single.tokens[0]), np.asarray(batched.tokens[b]))
    assert int(single.nfe[0]) == nfe[b]
  # Committed tokens never change: a run stopped after k passes agrees with the full run on
  # every slot committed in its first k passes, and leaves the others masked.
  steps = np.asarray(batched.commit_step)
  full = np.asarray(batched.tokens[:, 3:])
  for k in (2,):
    part = blockwise.decode_threshold(fn, prompts, 8, 4, 0.8, mask_id=MASK, max_passes=k)
    pt = np.asarray(part.tokens[:, 3:])
    early = steps < k
    np.testing.assert_array_equal(pt[early], full[early])
    assert (pt[~early] == MASK).all()


def test_temperature_sampling():
  fn = tiny_model()
  prompts = jnp.ones((3, 2), jnp.int32)
  dec = jax.jit(lambda p, k: blockwise.decode_threshold(fn, p, 8, 4, 0.9, mask_id=MASK,
                                                        temperature=1.0, key=k))
  a = dec(prompts, jax.random.PRNGKey(0))
  b = dec(prompts, jax.random.PRNGKey(0))
  c = dec(prompts, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert np.all(np.asarray(a.tokens[:, 2:]) != MASK)
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  assert (np.asarray(a.commit_conf) > 0).all()


def two_token_model(p_first):
  """Logits that ignore the tokens: SUBS probability p_first on id 1, 1 - p_first on id 2,
  (about) nothing elsewhere."""
  row = np.full((K + 1,), -1e4, np.float32)
  row[1], row[2] = np.log(p_first), np.log(1.0 - p_first)
  row[MASK] = 9.0
  row = jnp.asarray(row)
  return lambda tokens: jnp.broadcast_to(row, tokens.shape + row.shape)


def test_temperature_draws_are_tempered_and_confidence_is_not():
  """At temperature 0.5, p = (0.75, 0.25) becomes (0.9, 0.1) for the draw, while c (commit
  decisions, commit_conf) stays the untempered 0.75 / 0.25. With tau = 0.8 a tempered c (0.9)
  would commit both slots of a block in one pass; the untempered one commits only the top slot,
  so NFE = G."""
  fn = two_token_model(0.75)
  batch, g = 4000, 4
  prompts = jnp.ones((batch, 1), jnp.int32)
  with jax.enable_x64(True):
    res = jax.jit(lambda k: blockwise.decode_threshold(fn, prompts, g, 2, 0.8, mask_id=MASK,
                                                       temperature=0.5, key=k))(
        jax.random.PRNGKey(3))
  tok = np.asarray(res.tokens[:, 1:])
  conf = np.asarray(res.commit_conf)
  assert set(np.unique(tok).tolist()) == {1, 2}
  # Per block of 2: the first pass draws both slots and commits the more confident one, id 1
  # unless both drew id 2 (1 - 0.1^2 = 0.99); the second pass draws the last slot (0.9).
  # Untempered draws would give (1 - 0.25^2 + 0.75) / 2 = 0.84375.
  freq = (tok == 1).mean()
  assert abs(freq - 0.945) < 4 * np.sqrt(0.945 * 0.055 / tok.size), freq
  np.testing.assert_allclose(conf[tok == 1], 0.75, rtol=1e-5)
  np.testing.assert_allclose(conf[tok == 2], 0.25, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(res.nfe), g)
  # Greedy (temperature 0) takes id 1 everywhere, also with c = 0.75 < tau.
  greedy = blockwise.decode_threshold(fn, prompts[:2], g, 2, 0.8, mask_id=MASK)
  assert (np.asarray(greedy.tokens[:, 1:]) == 1).all() and (np.asarray(greedy.nfe) == g).all()


def test_threshold_tau_is_inclusive_in_the_decoder():
  """Two equally likely ids give c = 0.5 exactly: at tau = 0.5 every slot of a block commits in
  one pass (c >= tau); at the next float32 above 0.5 only the top slot does."""
  fn = two_token_model(0.5)
  prompts = jnp.ones((2, 1), jnp.int32)
  at = blockwise.decode_threshold(fn, prompts, 8, 4, 0.5, mask_id=MASK)
  np.testing.assert_allclose(np.asarray(at.commit_conf), 0.5)
  np.testing.assert_array_equal(np.asarray(at.nfe), 2)
  above = blockwise.decode_threshold(fn, prompts, 8, 4, float(np.nextafter(np.float32(0.5), 1)),
                                     mask_id=MASK)
  np.testing.assert_array_equal(np.asarray(above.nfe), 8)


def test_metrics():
  assert float(tokens_per_forward(jnp.array([8, 8]), jnp.array([4, 12]))) == pytest.approx(1.0)
  assert float(tokens_per_forward(jnp.array([6, 2]), jnp.array([4, 4]))) == pytest.approx(1.0)
  np.testing.assert_array_equal(
      np.asarray(content_length(jnp.array([[1, 2, EOS, 3], [1, 2, 3, 4], [EOS, 1, 1, 1]]), EOS)),
      [2, 4, 0])
  assert float(bits_per_token(4 * np.log(4.0), 2)) == pytest.approx(4.0, rel=1e-6)
  assert float(perplexity_bound(4 * np.log(4.0), 4)) == pytest.approx(4.0, rel=1e-6)
  lo, hi = wilson_interval(195, 1000)
  assert lo == pytest.approx(0.1716, abs=2e-4) and hi == pytest.approx(0.2207, abs=2e-4)
  lo, hi = wilson_interval(0, 10)
  assert lo == 0.0 and hi == pytest.approx(0.2775, abs=2e-4)
  # No trials, no interval (a report over an empty set says so); an impossible count is a bug.
  assert all(np.isnan(wilson_interval(0, 0)))
  with pytest.raises(ValueError, match="0 <= k <= n"):
    wilson_interval(11, 10)
  with pytest.raises(ValueError, match="0 <= k <= n"):
    wilson_interval(-1, 10)


def test_spearman_by_hand():
  from dlm_jax.metrics import spearman  # pylint: disable=g-import-not-at-top
  # Two points already have a correlation (+-1); one point or a constant side has none.
  assert spearman([1, 2], [5, 9]) == pytest.approx(1.0)
  assert spearman([1, 2], [9, 5]) == pytest.approx(-1.0)
  assert np.isnan(spearman([1], [2])) and np.isnan(spearman([1, 2, 3], [4, 4, 4]))
  # Ties take their average rank: x ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4);
  # rho = sum(dx dy) / sqrt(sum dx^2 sum dy^2) = 4.5 / sqrt(4.5 * 5) = 0.9486833.
  assert spearman([1, 3, 3, 7], [10, 20, 30, 40]) == pytest.approx(0.9486833, rel=1e-6)
  assert spearman([0.5, 0.25, 0.75], [2.0, 1.0, 3.0]) == pytest.approx(1.0)  # floats, not ints
