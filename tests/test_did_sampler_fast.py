"""The fast DID decoder (issue 19): "insert or not" per gap from the row mass first, the token
only where inserting. Exact enumeration of one step against the spec's weights, seeded
chi-square tests of both samplers against the exact law of one step and of whole samples, the
spec oracles, prompts and infilling (marked gaps only)."""

import itertools
import math

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from configs import did_tiny
from dlm_jax import methods
from dlm_jax.methods.base import SpecialIds
from dlm_jax.methods.did import dp as did_dp
from dlm_jax.methods.did import sampler as did_sampler

PAD, BOS, EOS, MASK = 0, 1, 2, 3
VOCAB = 6  # allowed insertions: 2 (EOS) , 4, 5
ALLOWED = (2, 4, 5)


def tiny_did(variant="fixed", seed=0, capacity=3):
  c = did_tiny.get_config()
  c.data.tokenizer = "bytes"
  c.data.seq_len = capacity
  c.model.num_layers = 1
  c.model.d_model = 16
  c.model.num_heads = 2
  c.model.max_len = 16
  c.did.variant = variant
  c.model.time_conditioning = variant == "variable"
  m = methods.get_method_class("did")(c, SpecialIds(bos=BOS, eos=EOS, mask=MASK, pad=PAD,
                                                     vocab_size=VOCAB))
  params = flax.linen.meta.unbox(m.init_params(jax.random.key(seed)))
  return m, params


def step_law(m, params, capacity, tokens, kappa, t=1.0, prompt_len=0):
  """{new sequence (without BOS): probability} of one step from `tokens` (without BOS), by the
  spec's definition on the reference scores: per open gap (g >= prompt_len), insert v with
  weight kappa s[g, v], nothing with weight max(0, 1 - kappa sum_v s[g, v]), normalised;
  insertions past capacity dropped left to right."""
  r = capacity + 1
  buf = np.full((1, r), BOS, np.int32)
  buf[0, 1:1 + len(tokens)] = tokens
  with jax.enable_x64(True):
    sc = np.asarray(m.score_fn(params, capacity, prompt_len)(
        jnp.asarray(buf), jnp.asarray([len(tokens) + 1]), jnp.asarray([t], jnp.float32)),
        np.float64)[0]
  rows = []
  for g in range(len(tokens) + 1):
    if g < prompt_len:
      rows.append([(None, 1.0)])
      continue
    s = np.where(np.isfinite(sc[g]), np.exp(sc[g]), 0.0)
    w = kappa * s
    total = max(1.0, w.sum())
    rows.append([(None, max(0.0, 1.0 - w.sum()) / total)] + [(v, w[v] / total) for v in ALLOWED])
  law = {}
  for combo in itertools.product(*rows):
    out, room = [], capacity - len(tokens)
    for g, (v, _) in enumerate(combo):
      if g > 0:
        out.append(tokens[g - 1])
      if v is not None and room > 0:
        out.append(v)
        room -= 1
    key = tuple(out)
    law[key] = law.get(key, 0.0) + math.prod(p for _, p in combo)
  return law


def chi2_pvalue(counts, probs, n):
  keys = sorted(probs)
  assert sum(counts.values()) == n and set(counts) <= set(probs), "an impossible outcome"
  obs = np.array([counts.get(k, 0) for k in keys], float)
  exp = np.array([probs[k] for k in keys]) * n
  small = exp < 5
  obs, exp = np.append(obs[~small], obs[small].sum()), np.append(exp[~small], exp[small].sum())
  keep = exp > 0
  return float(stats.chisquare(obs[keep], exp[keep]).pvalue)


def _run(m, params, capacity, num_steps, n, reference, key, kappa_last=1.0):
  layout = did_sampler.gap_layout([([], [True])] * n, capacity, BOS)
  use_cache = m.variant == "fixed"
  with jax.enable_x64(True):
    if reference:
      out = did_sampler.did_sample(m.score_fn(params, capacity), key, n, num_steps, capacity, BOS,
                                   kappa_last=kappa_last, use_cache=use_cache, pad_id=PAD)
    else:
      f, tl = m.split_score_fn(params, capacity)
      out = did_sampler.fast_did_sample(f, tl, key, layout, num_steps, kappa_last=kappa_last,
                                        use_cache=use_cache, pad_id=PAD, bos_id=BOS)
  return _counts(out), np.asarray(out[2])


@pytest.mark.parametrize("variant", ["fixed", "variable"])
def test_split_scores_equal_score_fn(variant):
  """log_mass[r] + token_log_probs(h[r]) == score_fn's scores on every open row."""
  m, params = tiny_did(variant, capacity=6)
  tok = jnp.asarray([[BOS, 4, 5, 2, 4, BOS, BOS], [BOS, 5, BOS, BOS, BOS, BOS, BOS]])
  lens, t = jnp.asarray([5, 2]), jnp.asarray([0.3, 0.8], jnp.float32)
  sc = np.asarray(m.score_fn(params, 6, 1)(tok, lens, t))
  f, tl = m.split_score_fn(params, 6, 1)
  h, lm = f(tok, lens, t)
  full = np.asarray(lm)[..., None] + np.asarray(tl(h.reshape(-1, h.shape[-1]))).reshape(sc.shape)
  open_row = (np.arange(7)[None] < np.asarray(lens)[:, None]) & (np.arange(7)[None] >= 1)
  np.testing.assert_allclose(full[open_row], sc[open_row], rtol=1e-5, atol=1e-6)
  assert np.all(np.isneginf(full[open_row][:, [PAD, BOS, MASK]]))


def _counts(out):
  tokens, lengths = np.asarray(out[0]), np.asarray(out[1])
  counts = {}
  for row, k in zip(tokens, lengths):
    counts[tuple(row[:k])] = counts.get(tuple(row[:k]), 0) + 1
  return counts


@pytest.mark.parametrize("variant", ["fixed", pytest.param("variable", marks=pytest.mark.slow)])
def test_one_step_enumerated_and_drawn(variant):
  """One step from [BOS, 4], kappa 0.6. Both gaps open (16 outcomes): the fast path's law
  (Bernoulli(min(1, kappa mass)) per gap, then the token) equals the spec's weights exactly,
  and 20,000 fast draws fit it. With 4 as a prompt (the gap before it closed) 20,000 draws of
  each sampler fit the exact law (chi-square, seeded)."""
  capacity, kappa, n = 3, 0.6, 20000
  m, params = tiny_did(variant, seed=1, capacity=capacity)
  law = step_law(m, params, capacity, [4], kappa)
  assert sum(law.values()) == pytest.approx(1.0, abs=1e-12)
  assert len(law) == 15  # inserting 4 before or after the 4 gives one sequence
  buf = jnp.asarray([[BOS, 4, BOS, BOS]])
  with jax.enable_x64(True):
    f, tl = m.split_score_fn(params, capacity)
    h, lm = f(buf, jnp.asarray([2]), jnp.asarray([1.0], jnp.float32))
    tok_p = np.exp(np.asarray(tl(h[0]), np.float64))
    p_ins = np.minimum(1.0, kappa * np.exp(np.asarray(lm[0], np.float64)))
  fast = {}
  for combo in itertools.product(*[[None] + list(ALLOWED)] * 2):
    p = math.prod((1 - p_ins[g]) if v is None else p_ins[g] * tok_p[g, v]
                  for g, v in enumerate(combo))
    key = tuple(x for x in (combo[0], 4, combo[1]) if x is not None)
    fast[key] = fast.get(key, 0.0) + p
  for k in law:
    assert fast[k] == pytest.approx(law[k], rel=1e-5, abs=1e-12), k
  with jax.enable_x64(True):
    lay = did_sampler.gap_layout([([4], [True, True])] * n, capacity, BOS)
    out = did_sampler.fast_did_sample(f, tl, jax.random.key(3), lay, 1, kappa_last=kappa,
                                      pad_id=PAD, bos_id=BOS)
    assert chi2_pvalue(_counts(out), law, n) > 1e-3
    law_p = step_law(m, params, capacity, [4], kappa, prompt_len=1)
    f1, tl1 = m.split_score_fn(params, capacity, 1)
    lay = did_sampler.gap_layout([([4], [False, True])] * n, capacity, BOS)
    out = did_sampler.fast_did_sample(f1, tl1, jax.random.key(4), lay, 1, kappa_last=kappa,
                                      pad_id=PAD, bos_id=BOS)
    assert chi2_pvalue(_counts(out), law_p, n) > 1e-3
    out = did_sampler.did_sample(m.score_fn(params, capacity, 1), jax.random.key(5), n, 1,
                                 capacity, BOS, prompt=jnp.full((n, 1), 4), kappa_last=kappa,
                                 pad_id=PAD)
    assert chi2_pvalue(_counts(out), law_p, n) > 1e-3


def full_law(m, params, capacity, num_steps):
  """Exact law of whole samples from [BOS] (T steps, kappa = 1 / (T - i)) by a dynamic program."""
  dist = {(): 1.0}
  for i in range(num_steps):
    kappa = 1.0 / (num_steps - i)
    new = {}
    for seq, p in dist.items():
      for y, q in step_law(m, params, capacity, list(seq), kappa, t=1.0 - i / num_steps).items():
        new[y] = new.get(y, 0.0) + p * q
    dist = new
  return dist


def test_full_samples_match_exact_law():
  """Whole samples (capacity 3, T = 2, fixed-length seqnorm model with its cache): both samplers
  fit the exact law of the final sequences (chi-square on 20,000 seeded samples each)."""
  capacity, steps = 3, 2
  m, params = tiny_did("fixed", seed=2, capacity=capacity)
  law = full_law(m, params, capacity, steps)
  assert sum(law.values()) == pytest.approx(1.0, abs=1e-9)
  n = 20000
  for reference in (False, True):
    counts, nfe = _run(m, params, capacity, steps, n, reference, jax.random.key(4))
    assert chi2_pvalue(counts, law, n) > 1e-3, reference
    assert nfe.max() <= steps


def split_of(score_fn):
  """(features, token_fn) of a full-score function: h = the scores themselves."""
  def features(tokens, lengths, t, open_rows=None):
    sc = jnp.asarray(score_fn(tokens, lengths, t), jnp.float32)
    lm = jax.nn.logsumexp(sc, axis=-1)
    if open_rows is not None:
      lm = jnp.where(open_rows, lm, -jnp.inf)
    return sc, lm
  return features, lambda h: h - jax.nn.logsumexp(h, axis=-1, keepdims=True)


A, B, C, D = 4, 5, 2, 6  # token ids of the oracles below (vocab 7)


def exact_ab_scores(tokens, lengths, t):
  b = tokens.shape[0]
  x0 = jnp.broadcast_to(jnp.asarray([A, B], jnp.int32), (b, 2))
  return did_dp.log_insertion_targets(x0, jnp.full((b,), 2), tokens[:, 1:], lengths - 1, 7)


def test_spec_oracle_data_ab():
  """Data {ab} with exact scores: T = 2 gives "ab" always, T = 1 gives "a" or "b" (1/2 each)."""
  f, tl = split_of(exact_ab_scores)
  lay = did_sampler.gap_layout([([], [True])] * 512, 2, BOS)
  with jax.enable_x64(True):
    tok, lens, nfe, dropped, _ = did_sampler.fast_did_sample(f, tl, jax.random.key(0), lay,
                                                             2, bos_id=BOS)
    np.testing.assert_array_equal(np.asarray(tok), np.tile([A, B], (512, 1)))
    tok, lens = did_sampler.fast_did_sample(f, tl, jax.random.key(1), lay, 1, bos_id=BOS)[:2]
  assert (np.asarray(lens) == 1).all()
  frac = np.mean(np.asarray(tok)[:, 0] == A)
  assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / 512)


BIG = 10.0


def insert_everywhere(token):
  def score_fn(tokens, lengths, t):
    b, r = tokens.shape
    sc = jnp.full((b, r, 7), -jnp.inf).at[..., token].set(BIG)
    return sc
  return score_fn


def test_infill_inserts_only_in_marked_gaps():
  """Given tokens a b c with only the gap after a open: every insertion lands between a and b
  (tokens inserted there keep the span open), b c stay last, nothing before a."""
  f, tl = split_of(insert_everywhere(D))
  lay = did_sampler.gap_layout([([A, B, C], [False, True, False, False])], 8, BOS)
  tok, lens, _, _, span = did_sampler.fast_did_sample(f, tl, jax.random.key(0), lay, 2,
                                                      bos_id=BOS, pad_id=-1)
  # step 1: one insertion after a; step 2: after a and after the new token -> a D D D b c
  np.testing.assert_array_equal(np.asarray(tok)[0, :6], [A, D, D, D, B, C])
  np.testing.assert_array_equal(np.asarray(span)[0, :6], [0, 1, 1, 1, 0, 0])
  assert int(lens[0]) == 6
  # A prefix prompt (only the gap after the prompt open) equals the reference decoder's output.
  prompt = jnp.asarray([[A, B, A]], jnp.int32)
  ref = did_sampler.did_sample(insert_everywhere(D), jax.random.key(1), 1, 3, 9, BOS, prompt=prompt,
                               pad_id=-1)
  lay = did_sampler.gap_layout([([A, B, A], [False, False, False, True])], 9, BOS)
  fast = did_sampler.fast_did_sample(f, tl, jax.random.key(1), lay, 3, bos_id=BOS, pad_id=-1)
  for a, b in zip(fast[:2], ref[:2]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_capacity_overflow_and_budget_chunks():
  """Insertions past capacity are dropped left to right and counted; a head budget of 1 row
  (many chunks per step) gives the reference's deterministic result."""
  f, tl = split_of(insert_everywhere(C))
  lay = did_sampler.gap_layout([([], [True])], 4, BOS)
  for budget in (1, None):
    tok, lens, _, dropped, _ = did_sampler.fast_did_sample(f, tl, jax.random.key(4), lay, 3,
                                                           bos_id=BOS, pad_id=-1, budget=budget)
    np.testing.assert_array_equal(np.asarray(lens), [4])
    np.testing.assert_array_equal(np.asarray(dropped), [3])
    np.testing.assert_array_equal(np.asarray(tok), [[C, C, C, C]])


def test_did_decoder_fast_default_keeps_prompt():
  """Method.sample: fast path by default; the prompt stays a prefix; reference on request."""
  m, params = tiny_did("fixed", capacity=8)
  s = ml_collections.ConfigDict(m.config.sample.to_dict())
  s.batch_size, s.num_steps, s.capacity = 3, 4, 8
  with jax.enable_x64(True):
    for reference in (False, True):
      s.reference = reference
      out = m.sample(params, jax.random.key(0), s, prompt=np.asarray([[BOS, 4, 5]] * 3))
      tok = np.asarray(out["tokens"])
      np.testing.assert_array_equal(tok[:, :2], [[4, 5]] * 3)
      assert out["prompt_len"] == 2


def test_token_head_runs_only_for_gaps_that_insert():
  """The cost rule of the fast DID path (issue 19): the token distribution is computed only
  for gaps that insert at a step (plus at most budget - 1 filler rows per step), not for every
  open gap at every step. The law tests cannot see this: the same draws come out either way."""
  def small_mass(tokens, lengths, t):
    b, r = tokens.shape
    return jnp.full((b, r, 7), -jnp.inf).at[..., A].set(math.log(0.03)).at[..., B].set(
        math.log(0.02))
  f, tl = split_of(small_mass)
  rows = []

  def counting_tl(h):
    n = h.shape[0]
    jax.debug.callback(lambda: rows.append(n))
    return tl(h)

  n_steps, budget, cap = 16, 4, 40
  lay = did_sampler.gap_layout([([], [True])] * 4, cap, BOS)
  with jax.enable_x64(True):
    tok, lens, nfe, dropped, _ = did_sampler.fast_did_sample(
        f, counting_tl, jax.random.key(3), lay, n_steps, bos_id=BOS, pad_id=-1, budget=budget)
    jax.block_until_ready(tok)
    jax.effects_barrier()
  inserted = int(np.asarray(lens).sum() + np.asarray(dropped).sum())
  assert inserted > 0 and max(rows) <= budget
  assert inserted <= sum(rows) <= inserted + (budget - 1) * n_steps, (sum(rows), inserted)
