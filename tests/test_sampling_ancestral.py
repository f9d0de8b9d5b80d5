"""Ancestral sampler: oracles O7 (step weights), O8 (cache NFE), O11 (float64 draws), the
scheduled heavy/light variant and common random numbers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.sampling import ancestral
from dlm_jax.scheduling import sampler as scheduled_sampler
from dlm_jax.sampling.common import categorical_f64, gumbel_noise, max_gumbel
from dlm_jax.scheduling.schedule import parse_schedule


def constant_model(probs, mask_id):
  """Logits [B, L, V] that ignore the tokens: SUBS probabilities `probs` over non-mask ids."""
  probs = np.asarray(probs, np.float64)
  row = np.insert(np.log(probs), mask_id, 3.0).astype(np.float32)  # mask logit is ignored
  row = jnp.asarray(row)
  return lambda tokens: jnp.broadcast_to(row, tokens.shape + row.shape)


def tiny_model(vocab, seed):
  """Deterministic token-dependent logits [B, L, V]; rows independent."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  emb = jax.random.normal(k1, (vocab, 8))
  pos = jax.random.normal(k2, (64, 8))
  out = jax.random.normal(k3, (8, vocab)) * 2.0

  def fn(tokens):
    h = emb[tokens] + pos[: tokens.shape[1]]
    return jnp.tanh(h + jnp.mean(h, axis=1, keepdims=True)) @ out
  return fn


def test_o7_step_weights():
  lp = jnp.log(jnp.array([0.6, 0.4, 0.0]))  # ids a, b, MASK (= 2)
  w = ancestral.ancestral_step_log_weights(lp, 0.75, 0.5, mask_id=2)
  np.testing.assert_allclose(np.exp(np.asarray(w)), [0.2, 0.1333333, 0.6666667], rtol=1e-6)
  # With the t_final = 0 grid every reveal step has probability 1/T (log-linear), and the
  # cosine schedule at T = 5 gives the spec's (0.309, 0.279, 0.221, 0.142, 0.049).
  for schedule, expect in (("loglinear", [0.2] * 5),
                           ("cosine", [0.309, 0.279, 0.221, 0.142, 0.049])):
    t = 1.0 - np.arange(6) / 5
    stay, probs = 1.0, []
    for i in range(5):
      wi = np.exp(np.asarray(ancestral.ancestral_step_log_weights(lp, t[i], t[i + 1], 2,
                                                                  schedule)))
      np.testing.assert_allclose(wi.sum(), 1.0, atol=1e-6)
      probs.append(stay * (1.0 - wi[2]))
      stay *= wi[2]
    np.testing.assert_allclose(probs, expect, atol=1e-3)
    assert stay == pytest.approx(0.0, abs=1e-9)


def test_o7_o8_draws_and_cache_nfe():
  """One batched run: token frequencies, no mask left, E[NFE] = T (1 - (1 - 1/T)^L)."""
  t_steps, length, batch = 8, 4, 20000
  mask_id = 2
  fn = constant_model([0.6, 0.4], mask_id)
  x0 = jnp.full((batch, length), mask_id, jnp.int32)
  maskable = jnp.ones((batch, length), bool)
  with jax.enable_x64(True):
    run = jax.jit(lambda k: ancestral.ancestral_sample(fn, k, x0, maskable, mask_id, t_steps))
    tokens, nfe = run(jax.random.PRNGKey(0))
    tokens, nfe = np.asarray(tokens), np.asarray(nfe)
  assert (tokens != mask_id).all()
  freq = (tokens == 0).mean()
  assert abs(freq - 0.6) < 4 * math.sqrt(0.24 / tokens.size)
  expect = t_steps * (1 - (1 - 1 / t_steps) ** length)
  assert expect == pytest.approx(3.3105, abs=1e-4)
  se = nfe.std() / math.sqrt(batch)
  assert abs(nfe.mean() - expect) < 4 * se, (nfe.mean(), expect, se)
  assert nfe.min() >= 1 and nfe.max() <= length


def test_o7_stay_mass_and_no_cache_nfe():
  """t_final = 0.5: each slot is still masked with probability 1 - alpha(0.5) = 0.5; without
  the cache NFE = number of steps at which the sample still had a mask."""
  t_steps, length, batch = 4, 2, 20000
  mask_id = 0
  fn = constant_model([0.25, 0.75], mask_id)
  x0 = jnp.full((batch, length), mask_id, jnp.int32)
  maskable = jnp.ones((batch, length), bool)
  with jax.enable_x64(True):
    run = jax.jit(lambda k: ancestral.ancestral_sample(fn, k, x0, maskable, mask_id, t_steps,
                                                       t_final=0.5, use_cache=False))
    tokens, nfe = map(np.asarray, run(jax.random.PRNGKey(1)))
  masked = tokens == mask_id
  assert abs(masked.mean() - 0.5) < 4 * math.sqrt(0.25 / masked.size)
  revealed = tokens[~masked]
  assert abs((revealed == 2).mean() - 0.75) < 4 * math.sqrt(0.1875 / revealed.size)
  # Per slot, P(revealed by the end of step i) = (i + 1) / 8. A step runs iff a mask is left.
  p_open = [1.0 - (i / 8) ** 2 for i in range(4)]  # P(a mask is left before step i)
  expect = sum(p_open)
  assert expect == pytest.approx(3.78125)
  assert abs(nfe.mean() - expect) < 4 * nfe.std() / math.sqrt(batch)


def test_o11_float64_draws():
  assert max_gumbel(jnp.float32) == pytest.approx(15.94, abs=0.01)
  assert max_gumbel(jnp.float64) == pytest.approx(36.04, abs=0.01)
  with jax.enable_x64(True):
    noise = gumbel_noise(jax.random.PRNGKey(0), (4,))
    assert noise.dtype == jnp.float64
    idx = categorical_f64(jax.random.PRNGKey(1), jnp.log(jnp.array([[0.2, 0.3, 0.5]] * 30000)))
    freq = np.bincount(np.asarray(idx), minlength=3) / 30000
    np.testing.assert_allclose(freq, [0.2, 0.3, 0.5], atol=0.012)
    assert not np.any(np.asarray(categorical_f64(
        jax.random.PRNGKey(2), jnp.log(jnp.array([[0.5, 0.0, 0.5]] * 1000)))) == 1)
  assert gumbel_noise(jax.random.PRNGKey(0), (4,)).dtype == jnp.float32  # documented fallback



def _eqns(jaxpr, out):
  """Every equation of a jaxpr, sub-jaxprs (loops, conds, jits) included."""
  for e in jaxpr.eqns:
    out.append(e)
    for p in e.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          _eqns(sub.jaxpr, out)
        elif hasattr(sub, "eqns"):
          _eqns(sub, out)
  return out


@pytest.mark.parametrize("x64", [True, False])
def test_o11_the_sampler_draws_in_float64(x64):
  """The traced ancestral sampler: under x64 every random draw takes 64 random bits and the
  categorical over the vocabulary is an argmax over float64 scores; without x64 both are 32-bit
  (the documented fallback)."""
  v, mask_id = 5, 4
  fn = constant_model([0.1, 0.2, 0.3, 0.4], mask_id)
  x0 = jnp.full((2, 3), mask_id, jnp.int32)
  maskable = jnp.ones((2, 3), bool)
  with jax.enable_x64(x64):
    jaxpr = jax.make_jaxpr(lambda k: ancestral.ancestral_sample(fn, k, x0, maskable, mask_id, 4))(
        jax.random.PRNGKey(0))
  eqns = _eqns(jaxpr.jaxpr, [])
  bits = [e for e in eqns if e.primitive.name == "random_bits"]
  draws = [e for e in eqns if e.primitive.name == "argmax" and e.invars[0].aval.shape[-1] == v]
  assert bits and draws
  want_bits, want_dtype = (64, jnp.float64) if x64 else (32, jnp.float32)
  assert {e.params["bit_width"] for e in bits} == {want_bits}
  assert any(e.outvars[0].aval.shape[-1] == v for e in bits)  # noise per vocabulary entry
  assert {e.invars[0].aval.dtype for e in draws} == {jnp.dtype(want_dtype)}


def test_o11_float64_gumbel_tail_passes_the_float32_cap():
  """The float64 noise the sampler draws reaches past the float32 cap (15.94): the largest of
  2^25 draws with this key is 19.3 (P(max > 15.94) = 1 - exp(-2^25 * 1.2e-7) = 0.98)."""
  with jax.enable_x64(True):
    top = jax.jit(lambda k: jnp.max(gumbel_noise(k, (1 << 25,))))(jax.random.PRNGKey(0))
  assert float(top) > max_gumbel(jnp.float32) + 3.0


def test_o11_common_random_numbers_resolve_float64_uniforms():
  """Inverse-CDF draws from shared uniforms: a token of probability 1e-10 between two equal
  halves owns u in [0.5 - 5e-11, 0.5 + 5e-11), so u = 0.5 draws it in float64; float32 rounds
  both CDF steps to 0.5 and draws the next token."""
  mask_id = 3
  fn = constant_model([0.5, 1e-10, 0.5 - 1e-10], mask_id)
  x0 = jnp.full((1, 2), mask_id, jnp.int32)
  maskable = jnp.ones((1, 2), bool)
  for x64, want in ((True, [1, 0]), (False, [2, 0])):
    with jax.enable_x64(x64):
      dtype = jnp.float64 if x64 else jnp.float32
      u = jnp.asarray(np.array([[[0.5, 0.25]]]), dtype)  # one step, t = 1 -> 0
      tokens, _ = ancestral.ancestral_sample(fn, jax.random.PRNGKey(0), x0, maskable, mask_id, 1,
                                             uniforms=u)
    np.testing.assert_array_equal(np.asarray(tokens[0]), want, err_msg=f"x64={x64}")


def test_scheduled_all_heavy_bit_for_bit_and_switch():
  vocab, mask_id, t_steps = 7, 6, 6
  heavy, light = tiny_model(vocab, 0), tiny_model(vocab, 1)
  x0 = jnp.concatenate([jnp.full((6, 3), 2, jnp.int32), jnp.full((6, 9), mask_id, jnp.int32)],
                       axis=1)
  maskable = jnp.broadcast_to(jnp.arange(12) >= 3, x0.shape)
  key = jax.random.PRNGKey(7)
  with jax.enable_x64(True):
    single = jax.jit(lambda k: ancestral.ancestral_sample(heavy, k, x0, maskable, mask_id,
                                                          t_steps))
    sched = jax.jit(lambda k, il: scheduled_sampler.scheduled_ancestral_sample(
        heavy, light, k, il, x0, maskable, mask_id, t_steps))
    tok_h, nfe_h = single(key)
    s_tok, s_h, s_l = sched(key, jnp.zeros((t_steps,), bool))
    np.testing.assert_array_equal(np.asarray(s_tok), np.asarray(tok_h))
    np.testing.assert_array_equal(np.asarray(s_h), np.asarray(nfe_h))
    assert (np.asarray(s_l) == 0).all()
    # Alternating models: every switch invalidates the cache, so every step that still has a
    # mask is a pass: heavy passes = ceil(n / 2), light = floor(n / 2) with n = steps run.
    alt = jnp.asarray(np.arange(t_steps) % 2 == 1)
    a_tok, a_h, a_l = map(np.asarray, sched(key, alt))
  assert (np.asarray(tok_h)[:, :3] == 2).all() and (np.asarray(tok_h) != mask_id).all()
  assert (a_tok != mask_id).all()
  n = a_h + a_l
  np.testing.assert_array_equal(a_h, (n + 1) // 2)
  np.testing.assert_array_equal(a_l, n // 2)
  assert (n >= 1).all() and (n <= t_steps).all()


def test_common_random_numbers():
  """Inverse-CDF draws from shared uniforms: the reveal pattern does not depend on the model,
  revealed tokens follow each model's probabilities."""
  t_steps, length, batch, mask_id = 4, 2, 20000, 0
  heavy = constant_model([0.6, 0.4], mask_id)
  light = constant_model([0.1, 0.9], mask_id)
  x0 = jnp.full((batch, length), mask_id, jnp.int32)
  maskable = jnp.ones((batch, length), bool)
  with jax.enable_x64(True):
    u = jax.random.uniform(jax.random.PRNGKey(3), (t_steps, batch, length), jnp.float64)
    run = jax.jit(lambda il: scheduled_sampler.scheduled_ancestral_sample(
        heavy, light, jax.random.PRNGKey(0), il, x0, maskable, mask_id, t_steps, t_final=0.5,
        uniforms=u))
    th = np.asarray(run(jnp.zeros((t_steps,), bool))[0])
    tl = np.asarray(run(jnp.ones((t_steps,), bool))[0])
  np.testing.assert_array_equal(th == mask_id, tl == mask_id)
  assert abs((th == mask_id).mean() - 0.5) < 0.01
  rev = th != mask_id
  assert abs((th[rev] == 1).mean() - 0.6) < 0.012
  assert abs((tl[rev] == 1).mean() - 0.1) < 0.01
  # Monotone coupling: heavy's token 2 (u' >= 0.6) implies light's token 2 (u' >= 0.1).
  assert np.all(tl[rev & (th == 2)] == 2)


def test_bad_inputs_raise():
  fn = constant_model([0.5, 0.5], 0)
  x = jnp.zeros((2, 3), jnp.int32)
  m = jnp.ones((2, 3), bool)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="x_init"):
    ancestral.ancestral_sample(fn, key, x[0], m[0], 0, 4)
  with pytest.raises(ValueError, match="maskable"):
    ancestral.ancestral_sample(fn, key, x, m[:, :2], 0, 4)
  with pytest.raises(ValueError, match="t_final"):
    ancestral.ancestral_sample(fn, key, x, m, 0, 4, t_final=1.0)
  with pytest.raises(ValueError, match="num_steps"):
    ancestral.ancestral_sample(fn, key, x, m, 0, 0)
  with pytest.raises(ValueError, match="uniforms"):
    ancestral.ancestral_sample(fn, key, x, m, 0, 4, uniforms=jnp.zeros((3, 2, 3)))
  with pytest.raises(ValueError, match="schedule"):
    ancestral.ancestral_sample(fn, key, x, m, 0, 4, schedule="linear")
  with pytest.raises(ValueError, match="is_light"):
    scheduled_sampler.scheduled_ancestral_sample(fn, fn, key, jnp.zeros((5,), bool), x, m, 0, 4)
  with pytest.raises(ValueError, match="is_light"):
    scheduled_sampler.scheduled_ancestral_sample(fn, fn, key, parse_schedule("L1,H4"), x, m, 0, 4)


# -- token-dependent model: the sampler's output distribution against exact enumeration ---------
# Tokens 0, 1, 2 and MASK = 3. Slot j of the generated pair sees the other slot's token o (or
# MASK) through a one-hot feature f_j = e(4 j + o), and the head W maps it to logits: a strong
# "copy the other slot" preference once it is revealed, and a different, position-dependent
# distribution while it is masked. Written as features @ head so that a sampler that caches
# hidden states and projects only some positions can be driven by the same model.
COPY_MASK = 3
COPY_HEAD = np.array([
    [3.0, 0.0, 0.0, 9.0], [0.0, 3.0, 0.0, 9.0], [0.0, 0.0, 3.0, 9.0], [1.0, 0.0, -1.0, 9.0],
    [2.5, 0.0, 0.0, 9.0], [0.0, 2.5, 0.0, 9.0], [0.0, 0.0, 2.5, 9.0], [-1.0, 0.5, 1.0, 9.0],
], np.float32)  # [8 features, V = 4]; column 3 (MASK) is ignored by SUBS


def copy_features(tokens):
  """[B, 3] tokens (prompt, slot 1, slot 2) -> [B, 3, 8] one-hot features."""
  other = jnp.stack([tokens[:, 0], tokens[:, 2], tokens[:, 1]], axis=1)  # slot 1 sees slot 2
  which = jnp.array([0, 0, 4])[None, :] + other
  return jax.nn.one_hot(which, 8, dtype=jnp.float32)


def copy_model(tokens):
  return copy_features(tokens) @ jnp.asarray(COPY_HEAD)


def exact_pair_distribution(num_steps, t_final=0.0):
  """P(slot 1, slot 2) after the ancestral chain, by enumerating every state at every step.

  Log-linear schedule: a masked slot is revealed at step t -> s with probability
  (alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t, to token v with p(v | current state).
  """
  def probs(state):
    f = np.zeros((2, 8))
    f[0, state[1]] = 1.0
    f[1, 4 + state[0]] = 1.0
    logits = (f @ COPY_HEAD.astype(np.float64))[:, :3]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)

  dist = {(COPY_MASK, COPY_MASK): 1.0}
  dt = (1.0 - t_final) / num_steps
  for i in range(num_steps):
    t, s = 1.0 - i * dt, 1.0 - (i + 1) * dt
    reveal = (t - s) / t
    new = {}
    for state, pr in dist.items():
      p = probs(state)
      options = []
      for j in range(2):
        if state[j] == COPY_MASK:
          options.append([(COPY_MASK, 1.0 - reveal)] + [(v, reveal * p[j, v]) for v in range(3)])
        else:
          options.append([(state[j], 1.0)])
      for a, pa in options[0]:
        for b, pb in options[1]:
          new[(a, b)] = new.get((a, b), 0.0) + pr * pa * pb
    dist = new
  return dist


# Every public way to run the ancestral sampler on a logits closure; a new sampler (e.g. one
# that caches hidden states) joins this list and must give the same distribution.
def _ancestral_cached(x0, maskable, key, t_steps, t_final):
  return ancestral.ancestral_sample(copy_model, key, x0, maskable, COPY_MASK, t_steps,
                                    t_final=t_final, use_cache=True)[0]


def _ancestral_uncached(x0, maskable, key, t_steps, t_final):
  return ancestral.ancestral_sample(copy_model, key, x0, maskable, COPY_MASK, t_steps,
                                    t_final=t_final, use_cache=False)[0]


def _scheduled_all_heavy(x0, maskable, key, t_steps, t_final):
  return scheduled_sampler.scheduled_ancestral_sample(
      copy_model, copy_model, key, jnp.zeros((t_steps,), bool), x0, maskable, COPY_MASK, t_steps,
      t_final=t_final)[0]


ANCESTRAL_SAMPLERS = {"cached": _ancestral_cached, "uncached": _ancestral_uncached,
                      "scheduled_all_heavy": _scheduled_all_heavy}


@pytest.mark.parametrize("name", sorted(ANCESTRAL_SAMPLERS))
@pytest.mark.parametrize("t_steps,t_final", [(4, 0.0), (3, 0.4)])
def test_token_dependent_model_matches_exact_enumeration(name, t_steps, t_final):
  """The joint distribution of two generated slots that read each other equals the exact
  enumeration of the chain. A sampler that reused stale logits (e.g. the first pass's) after a
  slot was revealed would copy far less often: P(equal) drops from ~0.8 to ~0.4 here."""
  batch = 20000
  exact = exact_pair_distribution(t_steps, t_final)
  assert sum(exact.values()) == pytest.approx(1.0, abs=1e-12)
  x0 = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32),
                        jnp.full((batch, 2), COPY_MASK, jnp.int32)], axis=1)
  maskable = jnp.broadcast_to(jnp.array([False, True, True]), x0.shape)
  with jax.enable_x64(True):
    run = jax.jit(lambda k: ANCESTRAL_SAMPLERS[name](x0, maskable, k, t_steps, t_final))
    tokens = np.asarray(run(jax.random.PRNGKey(5)))
  assert (tokens[:, 0] == 0).all()
  pairs = tokens[:, 1] * 4 + tokens[:, 2]
  counts = np.bincount(pairs, minlength=16) / batch
  for (a, b), p in exact.items():
    se = math.sqrt(max(p * (1 - p), 1e-4) / batch)
    assert abs(counts[a * 4 + b] - p) < 4.5 * se, (name, (a, b), counts[a * 4 + b], p)
  # The copy preference is strong: without t_final most pairs agree.
  if t_final == 0.0:
    agree = sum(p for (a, b), p in exact.items() if a == b)
    assert agree > 0.7
