"""The fast samplers (issue 19): the same distribution as the reference ones at the cost of the
trunk. Exact one-step transition distributions enumerated on a tiny vocabulary, seeded
chi-square tests on one step and on whole samples against an exact dynamic program, the
budget-overflow path, common random numbers, blockwise decoding equal to the reference, and
the split of real models (head(features) == logits)."""

import dataclasses
import itertools
import math

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from dlm_jax import methods
from dlm_jax.diffusion import schedules
from dlm_jax.diffusion.masked import subs_log_probs
from dlm_jax.methods.base import SpecialIds
from dlm_jax.sampling import ancestral, blockwise, r2 as r2_lib, sparse
from dlm_jax.sampling.common import masked_layout, prefix_layout
from dlm_jax.scheduling import sampler as scheduled_sampler
from tests.tiny import tiny_config

V, MASK = 4, 3  # token ids 0, 1, 2 and [MASK] = 3


def tiny_denoiser(vocab, seed, scale=2.0):
  """A token-dependent denoiser split at its hidden state; padding (valid False) is ignored by
  the real positions, as segment ids do in the transformer."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  emb = jax.random.normal(k1, (vocab, 8))
  pos = jax.random.normal(k2, (64, 8))
  out = jax.random.normal(k3, (8, vocab)) * scale

  def features(tokens, valid=None):
    h = emb[tokens] + pos[: tokens.shape[1]]
    w = jnp.ones(tokens.shape, h.dtype) if valid is None else valid.astype(h.dtype)
    mean = jnp.sum(h * w[..., None], axis=1, keepdims=True) / jnp.sum(w, axis=1)[:, None, None]
    return jnp.tanh(h + mean)

  return sparse.Denoiser(features=features, head=lambda h: h @ out)


def exact_step(den, x, t, s, schedule="loglinear"):
  """{outcome tuple: probability} of one step t -> s from state x [L] (float64, by definition)."""
  with jax.enable_x64(True):
    logits = np.asarray(den.logits(jnp.asarray(x)[None]), np.float64)[0]
    p = float(ancestral.reveal_probability(schedule, np.float64(t), np.float64(s)))
  q = np.exp(logits - logits.max(-1, keepdims=True))
  q[:, MASK] = 0.0
  q /= q.sum(-1, keepdims=True)
  choices = [[(MASK, 1.0 - p)] + [(v, p * q[l, v]) for v in range(V) if v != MASK]
             if x[l] == MASK else [(x[l], 1.0)] for l in range(len(x))]
  return {tuple(c[0] for c in combo): math.prod(c[1] for c in combo)
          for combo in itertools.product(*choices)}


def chi2_pvalue(counts: dict, probs: dict, n: int, min_expected: float = 5.0) -> float:
  """Chi-square goodness of fit; cells with a small expectation are pooled into one."""
  keys = sorted(probs)
  obs = np.array([counts.get(k, 0) for k in keys], float)
  exp = np.array([probs[k] for k in keys]) * n
  assert sum(counts.values()) == n and set(counts) <= set(probs), "an impossible outcome"
  small = exp < min_expected
  obs = np.append(obs[~small], obs[small].sum())
  exp = np.append(exp[~small], exp[small].sum())
  keep = exp > 0
  return float(stats.chisquare(obs[keep], exp[keep]).pvalue)


@pytest.mark.parametrize("schedule,t,s", [("loglinear", 0.75, 0.5), ("loglinear", 1.0, 0.4),
                                          ("cosine", 1.0, 0.3)])
def test_one_step_transition_enumerated_equals_reference(schedule, t, s):
  """Every outcome of one step, 3 masked slots and a given one: the reference's step weights
  (V + 1 outcomes per slot) and the fast path's (reveal with reveal_probability, then the
  token from the head's softmax) give the same transition distribution."""
  den = tiny_denoiser(V, 0)
  x = np.array([MASK, 1, MASK, MASK])
  fast = exact_step(den, x, t, s, schedule)
  with jax.enable_x64(True):
    lp = subs_log_probs(den.logits(jnp.asarray(x)[None])[0], MASK, dtype=jnp.float64)
    w = np.exp(np.asarray(ancestral.ancestral_step_log_weights(lp, t, s, MASK, schedule)))
  ref = {}
  for combo in itertools.product(*[range(V) if x[l] == MASK else [x[l]] for l in range(4)]):
    ref[combo] = math.prod(w[l, combo[l]] for l in range(4) if x[l] == MASK)
  assert len(fast) == len(ref) == 64
  assert sum(fast.values()) == pytest.approx(1.0, abs=1e-12)
  for k in ref:
    assert fast[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-15), k


def _one_step_counts(sample_fn, x, n):
  tokens = np.asarray(sample_fn(jnp.tile(jnp.asarray(x)[None], (n, 1))))
  counts = {}
  for row in map(tuple, tokens):
    counts[row] = counts.get(row, 0) + 1
  return counts


@pytest.mark.parametrize("schedule,t_final", [("loglinear", 0.4), ("cosine", 0.3)])
def test_one_step_draws_follow_the_enumeration(schedule, t_final):
  """One step (T = 1, 1 -> t_final) drawn 20,000 times by each sampler: both fit the enumerated
  distribution (chi-square; seeded)."""
  den = tiny_denoiser(V, 1)
  x = np.array([MASK, 2, MASK, MASK])
  probs = exact_step(den, x, 1.0, t_final, schedule)
  n = 20000
  maskable = jnp.asarray(x == MASK)
  with jax.enable_x64(True):
    def fast(x0):
      return ancestral.fast_ancestral_sample(den, jax.random.PRNGKey(5), x0,
                                             jnp.broadcast_to(maskable, x0.shape), MASK, 1,
                                             schedule=schedule, t_final=t_final)[0]

    def ref(x0):
      return ancestral.ancestral_sample(den.logits, jax.random.PRNGKey(5), x0,
                                        jnp.broadcast_to(maskable, x0.shape), MASK, 1,
                                        schedule=schedule, t_final=t_final)[0]

    for fn in (fast, ref):
      counts = _one_step_counts(jax.jit(fn), x, n)
      assert chi2_pvalue(counts, probs, n) > 1e-3, fn.__name__


def exact_samples(den, x0, maskable, num_steps, schedule="loglinear"):
  """Exact joint law of (final tokens, NFE) of ancestral sampling (t_final = 0, cache on) by a
  dynamic program over states; NFE = number of distinct steps that reveal a slot (O8)."""
  grid = 1.0 - np.arange(num_steps + 1) / num_steps
  dist = {(tuple(x0), 0): 1.0}
  for i in range(num_steps):
    new = {}
    for (x, nfe), px in dist.items():
      x = np.array(x)
      if not np.any((x == MASK) & maskable):
        new[(tuple(x), nfe)] = new.get((tuple(x), nfe), 0.0) + px
        continue
      for y, py in exact_step(den, np.where(maskable, x, x), grid[i], grid[i + 1],
                              schedule).items():
        revealed = int(any(a != b for a, b in zip(x, y)))
        k = (tuple(y), nfe + revealed)
        new[k] = new.get(k, 0.0) + px * py
    dist = new
  return dist


def test_full_samples_match_exact_law():
  """Whole samples (L = 3 masked slots after one prompt token, T = 4): the joint law of
  (tokens, NFE) of each sampler fits the exact one (chi-square on 20,000 seeded samples)."""
  den = tiny_denoiser(V, 2, scale=1.5)
  x0 = np.array([1, MASK, MASK, MASK])
  maskable = x0 == MASK
  probs = exact_samples(den, x0, maskable, 4)
  assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)
  n = 20000
  xb = jnp.tile(jnp.asarray(x0)[None], (n, 1))
  mb = jnp.tile(jnp.asarray(maskable)[None], (n, 1))
  with jax.enable_x64(True):
    fast = jax.jit(lambda k: ancestral.fast_ancestral_sample(den, k, xb, mb, MASK, 4))
    ref = jax.jit(lambda k: ancestral.ancestral_sample(den.logits, k, xb, mb, MASK, 4))
    for name, fn in (("fast", fast), ("reference", ref)):
      tokens, nfe = map(np.asarray, fn(jax.random.PRNGKey(11)))
      counts = {}
      for row, k in zip(map(tuple, tokens), nfe):
        counts[(row, int(k))] = counts.get((row, int(k)), 0) + 1
      assert chi2_pvalue(counts, probs, n) > 1e-3, name
      assert (tokens[:, 0] == 1).all() and (tokens != MASK).all()


def test_fast_nfe_o8():
  """E[NFE] = T (1 - (1 - 1/T)^L) (O8) with the fast sampler; each pass reveals >= 1 slot."""
  t_steps, length, batch = 8, 4, 20000
  den = tiny_denoiser(V, 3)
  x0 = jnp.full((batch, length), MASK, jnp.int32)
  with jax.enable_x64(True):
    tokens, nfe = map(np.asarray, jax.jit(lambda k: ancestral.fast_ancestral_sample(
        den, k, x0, jnp.ones_like(x0, bool), MASK, t_steps))(jax.random.PRNGKey(0)))
  expect = t_steps * (1 - (1 - 1 / t_steps) ** length)
  assert abs(nfe.mean() - expect) < 4 * nfe.std() / math.sqrt(batch), (nfe.mean(), expect)
  assert (tokens != MASK).all() and nfe.min() >= 1 and nfe.max() <= length


def test_crn_reveals_equal_reference_and_budget_overflow_is_exact():
  """With common random numbers the fast path reveals exactly the reference's slots and draws
  the same tokens; a budget of 1 head row (every step overflows into more chunks) changes
  nothing; with t_final > 0 the final argmax pass fills the leftovers."""
  vocab, mask_id, t_steps = 9, 8, 6
  den = tiny_denoiser(vocab, 4)
  b, length = 16, 12
  x0 = jnp.concatenate([jnp.full((b, 3), 2, jnp.int32), jnp.full((b, 9), mask_id, jnp.int32)], 1)
  maskable = jnp.broadcast_to(jnp.arange(length) >= 3, x0.shape)
  with jax.enable_x64(True):
    u = jax.random.uniform(jax.random.PRNGKey(3), (t_steps, b, length), jnp.float64)
    for t_final, budgets in ((0.0, (None,)), (0.3, (None, 1))):
      ref_tok, ref_nfe = ancestral.ancestral_sample(den.logits, jax.random.PRNGKey(0), x0,
                                                    maskable, mask_id, t_steps, t_final=t_final,
                                                    final_argmax=t_final > 0, uniforms=u)
      for budget in budgets:
        tok, nfe = ancestral.fast_ancestral_sample(den, jax.random.PRNGKey(0), x0, maskable,
                                                   mask_id, t_steps, t_final=t_final,
                                                   final_argmax=t_final > 0, uniforms=u,
                                                   budget=budget)
        np.testing.assert_array_equal(np.asarray(tok), np.asarray(ref_tok))
        np.testing.assert_array_equal(np.asarray(nfe), np.asarray(ref_nfe))


def test_float64_draws_and_reference_switch_in_decoder():
  """The fast path's reveal uniforms and token draws are float64 under x64 (O11)."""
  seen = []
  orig = ancestral.categorical_inverse_cdf

  def spy(key, lw):
    seen.append(lw.dtype)
    return orig(key, lw)

  den = tiny_denoiser(V, 5)
  x0 = jnp.full((2, 3), MASK, jnp.int32)
  ancestral.categorical_inverse_cdf = spy
  try:
    with jax.enable_x64(True):
      ancestral.fast_ancestral_sample(den, jax.random.PRNGKey(0), x0, jnp.ones_like(x0, bool),
                                      MASK, 2)
  finally:
    ancestral.categorical_inverse_cdf = orig
  assert seen and all(d == jnp.float64 for d in seen)


def test_padding_rows_equal_unpadded():
  """A row padded on the right (valid False) samples exactly as the unpadded row (same key and
  CRN uniforms): padding is invisible to the real positions."""
  vocab, mask_id = 9, 8
  den = tiny_denoiser(vocab, 6)
  x = jnp.asarray([[1, 2, mask_id, mask_id, mask_id]], jnp.int32)
  m = x == mask_id
  xp = jnp.concatenate([x, jnp.full((1, 3), 0, jnp.int32)], 1)
  mp = jnp.concatenate([m, jnp.zeros((1, 3), bool)], 1)
  valid = jnp.arange(8)[None] < 5
  with jax.enable_x64(True):
    u = jax.random.uniform(jax.random.PRNGKey(0), (4, 1, 8), jnp.float64)
    a, _ = ancestral.fast_ancestral_sample(den, jax.random.PRNGKey(1), x, m, mask_id, 4,
                                           uniforms=u[:, :, :5])
    b, _ = ancestral.fast_ancestral_sample(den, jax.random.PRNGKey(1), xp, mp, mask_id, 4,
                                           uniforms=u, valid=valid)
  np.testing.assert_array_equal(np.asarray(b)[:, :5], np.asarray(a))
  np.testing.assert_array_equal(np.asarray(b)[:, 5:], 0)


def test_refresh_rows_and_for_selected_rows():
  """Sub-batched trunk passes touch exactly the needing rows; chunked rows cover every
  selected position once, whatever the budget."""
  x = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
  cache = jnp.zeros((8, 3))
  for need in ([0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 1, 0, 0],
               [1] * 8, [0, 1, 1, 1, 1, 1, 0, 0]):
    need = jnp.asarray(need, bool)
    out = sparse.refresh_rows(lambda a: a * 10.0, x, need, cache)
    np.testing.assert_array_equal(np.asarray(out), np.where(np.asarray(need)[:, None],
                                                            np.asarray(x) * 10.0, 0.0))
  assert sparse.bucket_sizes(8) == (1, 2, 4, 8) and sparse.bucket_sizes(6) == (1, 2, 4, 6)
  assert sparse.bucket_sizes(1) == (1,)
  sel = jnp.asarray(np.random.RandomState(0).rand(50) < 0.3)
  for budget in (1, 3, 7, 64):
    def body(c, idx, ok, acc):
      return acc.at[jnp.where(ok, idx, 50)].add(1, mode="drop")
    got = sparse.for_selected_rows(sel, budget, body, jnp.zeros((50,), jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(sel).astype(int))


def counting_head(den):
  """`den` whose head records how many rows each call (a chunk) computes."""
  rows = []

  def head(h):
    n = h.shape[0]
    jax.debug.callback(lambda: rows.append(n))
    return den.head(h)
  return dataclasses.replace(den, head=head), rows


def test_head_runs_only_where_tokens_are_drawn():
  """The cost rule of the fast paths (issue 19): ancestral sampling computes the head for the
  slots it reveals (plus at most budget - 1 filler rows per step), never for every masked slot
  at every step; threshold decoding only for the masked slots of each sample's active block.
  The equality tests above cannot see this: a head over all positions draws the same tokens."""
  vocab, mask_id, b, gen, t_steps, budget = 12, 11, 4, 16, 32, 4
  den, rows = counting_head(tiny_denoiser(vocab, 40, scale=3.0))
  x0 = jnp.concatenate([jnp.full((b, 1), 2, jnp.int32), jnp.full((b, gen), mask_id, jnp.int32)], 1)
  maskable = jnp.broadcast_to(jnp.arange(gen + 1) >= 1, x0.shape)
  with jax.enable_x64(True):
    tok, _ = ancestral.fast_ancestral_sample(den, jax.random.PRNGKey(0), x0, maskable, mask_id,
                                             t_steps, budget=budget)
    jax.block_until_ready(tok)
    jax.effects_barrier()
  assert (np.asarray(tok) != mask_id).all()
  assert rows and max(rows) <= budget
  # b * gen = 64 reveals in all; the full head would be b * (gen + 1) rows at every step.
  assert b * gen <= sum(rows) <= b * gen + (budget - 1) * t_steps, sum(rows)
  rows.clear()
  block = 4
  prompt = jnp.full((b, 3), 2, jnp.int32)
  layout = prefix_layout(np.asarray(prompt), gen, mask_id, block)
  with jax.enable_x64(True):
    res = blockwise.fast_decode_threshold(den, layout, block, 0.9, mask_id=mask_id, budget=budget)
    jax.block_until_ready(res.tokens)
    jax.effects_barrier()
  passes = int(np.asarray(res.nfe).max())
  assert rows and max(rows) <= budget
  # At most b * block masked slots in the active blocks per pass (+ filler of the last chunk).
  assert sum(rows) <= passes * (b * block + budget - 1), (sum(rows), passes)
  assert sum(rows) >= b * gen


# -- blockwise -------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["threshold", "threshold_r2", "fixed_k"])
def test_fast_blockwise_equals_reference(policy):
  """Greedy blockwise decoding: the fast path commits what the reference commits (tokens, NFE,
  commit steps and rules), with the default budget and with a budget of 2 head rows."""
  vocab, mask_id = 12, 11
  with jax.enable_x64(True):
    for seed in range(2):
      den = tiny_denoiser(vocab, 10 + seed, scale=3.0)
      prompt = jax.random.randint(jax.random.PRNGKey(seed), (5, 3), 0, mask_id)
      layout = prefix_layout(np.asarray(prompt), 16, mask_id, 4)
      for tau in (0.9, 0.3):
        if policy == "fixed_k":
          ref = blockwise.decode_fixed_k(den.logits, prompt, 16, 4, 8, mask_id)
          fasts = [blockwise.fast_decode_fixed_k(den, layout, 4, 8, mask_id, budget=b)
                   for b in (None, 2)]
        else:
          r2 = r2_lib.R2Config.from_flags("all", tau=tau) if policy == "threshold_r2" else None
          ref = blockwise.decode_threshold(den.logits, prompt, 16, 4, tau, mask_id=mask_id, r2=r2)
          fasts = [blockwise.fast_decode_threshold(den, layout, 4, tau, mask_id=mask_id, r2=r2,
                                                   budget=b) for b in (None, 2)]
        for fast in fasts:
          for f in ("tokens", "nfe", "commit_step", "commit_rule"):
            np.testing.assert_array_equal(np.asarray(getattr(fast, f)),
                                          np.asarray(getattr(ref, f)), err_msg=f)
          np.testing.assert_allclose(np.asarray(fast.commit_conf), np.asarray(ref.commit_conf),
                                     rtol=1e-5)


def test_fast_blockwise_infill_layout():
  """Fill slots scattered over the row (two spans, a partial last block): only they change,
  every pass commits >= 1 slot, and given tokens stay."""
  vocab, mask_id = 12, 11
  den = tiny_denoiser(vocab, 20, scale=3.0)
  tokens = np.array([[1, 2, 0, 0, 0, 3, 4, 0, 0, 5], [6, 0, 0, 7, 7, 7, 7, 7, 0, 5]])
  fill = np.array([[0, 0, 1, 1, 1, 0, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0, 0, 1, 0]], bool)
  layout = masked_layout(tokens, fill, None, mask_id, block_len=2)
  assert layout.gen_pos.shape == (2, 6) and layout.gen_ok.sum() == 8
  with jax.enable_x64(True):
    for res in (blockwise.fast_decode_threshold(den, layout, 2, 0.9, mask_id=mask_id),
                blockwise.fast_decode_fixed_k(den, layout, 2, 6, mask_id)):
      out = np.asarray(res.tokens)
      np.testing.assert_array_equal(out[~fill], tokens[~fill])
      assert (out[fill] != mask_id).all()
      blocks = -(-fill.sum(axis=1) // 2)  # every pass commits >= 1 slot of one block
      assert (np.asarray(res.nfe) >= blocks).all() and (np.asarray(res.nfe) <= fill.sum(1)).all()


# -- scheduling ------------------------------------------------------------------------------
def test_fast_scheduled_all_heavy_equals_single_and_crn():
  vocab, mask_id, t_steps = 7, 6, 6
  heavy, light = tiny_denoiser(vocab, 30), tiny_denoiser(vocab, 31)
  x0 = jnp.concatenate([jnp.full((6, 3), 2, jnp.int32), jnp.full((6, 9), mask_id, jnp.int32)], 1)
  maskable = jnp.broadcast_to(jnp.arange(12) >= 3, x0.shape)
  key = jax.random.PRNGKey(7)
  with jax.enable_x64(True):
    single = ancestral.fast_ancestral_sample(heavy, key, x0, maskable, mask_id, t_steps)
    tok, nh, nl = scheduled_sampler.fast_scheduled_ancestral_sample(
        heavy, light, key, jnp.zeros((t_steps,), bool), x0, maskable, mask_id, t_steps)
    np.testing.assert_array_equal(np.asarray(tok), np.asarray(single[0]))
    np.testing.assert_array_equal(np.asarray(nh), np.asarray(single[1]))
    assert (np.asarray(nl) == 0).all()
    # Common random numbers: alternating models, same reveal pattern and tokens as the reference.
    u = jax.random.uniform(jax.random.PRNGKey(3), (t_steps, 6, 12), jnp.float64)
    alt = jnp.asarray(np.arange(t_steps) % 2 == 1)
    ref = scheduled_sampler.scheduled_ancestral_sample(heavy.logits, light.logits, key, alt, x0,
                                                       maskable, mask_id, t_steps, uniforms=u)
    fast = scheduled_sampler.fast_scheduled_ancestral_sample(heavy, light, key, alt, x0,
                                                             maskable, mask_id, t_steps,
                                                             uniforms=u)
    np.testing.assert_array_equal(np.asarray(fast[0]), np.asarray(ref[0]))
    # The fast path runs a model only where it reveals: never more passes than the reference.
    assert (np.asarray(fast[1]) + np.asarray(fast[2]) <= np.asarray(ref[1]) + np.asarray(ref[2])).all()


# -- real models: the split is exact -------------------------------------------------------------
@pytest.mark.parametrize("tie,dtype", [(False, "float32"), (True, "float32"), (False, "bfloat16"),
                                       (True, "bfloat16")])
def test_method_denoiser_head_equals_logits(tie, dtype):
  c = tiny_config(model__tie_embeddings=tie, model__dtype=dtype)
  ids = SpecialIds(bos=1, eos=2, mask=3, pad=0, vocab_size=40)
  m = methods.get_method_class("mdlm")(c, ids)
  params = flax.linen.meta.unbox(m.init_params(jax.random.key(0)))
  tok = jax.random.randint(jax.random.key(1), (3, 20), 0, 40)
  den = m.denoiser(params)
  np.testing.assert_array_equal(np.asarray(den.logits(tok)), np.asarray(m.logits_fn(params)(tok)))


def test_mdlm_decoders_fast_by_default_reference_on_request():
  """Method.sample uses the fast loops unless sample.reference; greedy decoders agree."""
  c = tiny_config()
  ids = SpecialIds(bos=1, eos=2, mask=3, pad=0, vocab_size=40)
  m = methods.get_method_class("mdlm")(c, ids)
  params = flax.linen.meta.unbox(m.init_params(jax.random.key(0)))
  calls = {"logits": 0}
  orig = m.logits_fn

  def counting(p):
    calls["logits"] += 1
    return orig(p)

  m.logits_fn = counting
  with jax.enable_x64(True):
    for dec in ("ancestral", "threshold"):
      s = ml_collections.ConfigDict(c.sample.to_dict())
      s.decoder, s.num_steps, s.batch_size = dec, 8, 2
      fast = m.sample(params, jax.random.key(2), s)
      assert calls["logits"] == 0
      s.reference = True
      ref = m.sample(params, jax.random.key(2), s)
      assert calls["logits"] == 1
      calls["logits"] = 0
      if dec == "threshold":
        np.testing.assert_array_equal(np.asarray(fast["tokens"]), np.asarray(ref["tokens"]))
      assert np.asarray(fast["tokens"]).shape == np.asarray(ref["tokens"]).shape


def test_categorical_inverse_cdf_is_exact():
  """The fast decoders' float64 draw: the two-stage inverse CDF picks exactly the id whose
  cumulative weight brackets the uniform (checked against float64 numpy with the same
  uniforms), never an id of weight 0, and its frequencies fit the law (chi-square)."""
  from dlm_jax.sampling.common import categorical_inverse_cdf
  rng = np.random.RandomState(0)
  v = 300  # three blocks of 128, the last one partial; block 1 has no weight at all
  w = rng.gamma(0.3, size=(v,))
  w[128:256] = 0.0
  w[5] = 0.0
  lw = np.where(w > 0, np.log(np.maximum(w, 1e-300)), -np.inf)
  k = 6
  with jax.enable_x64(True):
    key = jax.random.PRNGKey(4)
    got = np.asarray(categorical_inverse_cdf(key, jnp.asarray(np.tile(lw, (k, 1)))))
    k1, k2 = jax.random.split(key)
    u1 = np.asarray(jax.random.uniform(k1, (k,), jnp.float64))
    u2 = np.asarray(jax.random.uniform(k2, (k,), jnp.float64))
    assert u1.dtype == np.float64
    wp = np.exp(lw - lw.max())
    wp = np.pad(wp, (0, 384 - v)).reshape(3, 128)
    for i in range(k):
      cb = np.cumsum(wp.sum(1))
      blk = int(np.sum(cb <= u1[i] * cb[-1]))
      ci = np.cumsum(wp[blk])
      assert got[i] == blk * 128 + int(np.sum(ci <= u2[i] * ci[-1]))
    n = 40000
    draws = np.asarray(categorical_inverse_cdf(jax.random.PRNGKey(5),
                                               jnp.asarray(np.tile(lw, (n, 1)))))
  assert not np.isin(draws, np.nonzero(w == 0)[0]).any()
  counts = dict(zip(*np.unique(draws, return_counts=True)))
  probs = {i: w[i] / w.sum() for i in range(v) if w[i] > 0}
  assert chi2_pvalue(counts, probs, n) > 1e-3
