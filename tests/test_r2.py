"""R²-dLLM rules: oracles R2-A, R2-B, R2-C and the invariants of spec/decoding.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.sampling import blockwise, r2
from dlm_jax.sampling.common import RULE_TEMPORAL, RULE_THRESHOLD

MASK = 0  # [MASK] id in the scripted models
K = 16  # non-mask ids 1..K


def scripted_logits(conf, yhat):
  """Logits [..., K + 1] whose SUBS softmax puts probability conf on yhat (ids 1..K)."""
  conf = np.asarray(conf, np.float64)
  yhat = np.asarray(yhat)
  rest = np.log((1.0 - conf) / (K - 1))
  out = np.repeat(rest[..., None], K + 1, axis=-1)
  np.put_along_axis(out, yhat[..., None], np.log(conf)[..., None], axis=-1)
  out[..., MASK] = 5.0  # ignored by SUBS
  return out.astype(np.float32)


def commit_sets(commits):
  return [set(np.flatnonzero(np.asarray(row)).tolist()) for row in commits]


_commit = jax.jit(r2.r2_commit, static_argnames=("cfg",))


def one_pass(conf, yhat, cfg=r2.R2Config(), masked=None, tracker=None):
  lb = len(conf)
  masked = jnp.ones((lb,), bool) if masked is None else jnp.asarray(masked)
  tracker = r2.Tracker.empty((lb,)) if tracker is None else tracker
  commits, tr = _commit(masked, jnp.asarray(conf, jnp.float32), jnp.asarray(yhat, jnp.int32),
                        tracker, cfg=cfg)
  return commit_sets(commits), tr


R2A_CONF = [0.95, 0.85, 0.79, 0.72, 0.30, 0.82, 0.78, 0.20]
R2A_YHAT = [1, 2, 3, 4, 5, 6, 6, 7]  # A B C D E F F G


def test_r2a_one_pass():
  sets, tr = one_pass(R2A_CONF, R2A_YHAT)
  assert sets == [{0}, {1, 2}, {5}, set()]
  committed = set().union(*sets)
  assert len(committed) == 4
  assert set(range(8)) - committed == {3, 4, 6, 7}
  # Trackers: cleared for committed slots, started (count 1) for the rest.
  np.testing.assert_array_equal(np.asarray(tr.count), [0, 0, 0, 1, 1, 0, 1, 1])
  np.testing.assert_array_equal(np.asarray(tr.tok), [-1, -1, -1, 4, 5, -1, 6, 7])
  # Fast-dLLM alone commits 1 token.
  sets0, _ = one_pass(R2A_CONF, R2A_YHAT, r2.R2Config.none())
  assert sets0 == [{0}, set(), set(), set()]


def test_r2a_c5_080_token_cluster_strict():
  conf = list(R2A_CONF)
  conf[5] = 0.80
  sets, _ = one_pass(conf, R2A_YHAT)
  assert sets[2] == set()  # max c = 0.80 is not > 0.80
  assert sets[:2] == [{0}, {1, 2}]


def test_r2c_low_confidence_window():
  sets, _ = one_pass([0.89, 0.63, 0.89, 0.10, 0.895, 0.10], [1, 2, 3, 4, 5, 6])
  assert sets == [{4}, {0, 1, 2}, set(), set()]


def test_token_cluster_modes():
  conf = [0.10, 0.70, 0.85, 0.85, 0.20, 0.10]
  yhat = [1, 3, 3, 3, 2, 4]
  base = dict(window=None, temporal_steps=None, tau=0.95)
  # Rule 1 takes the argmax slot 2, splitting the run into {1} and {3}: no run >= 2.
  sets, _ = one_pass(conf, yhat, r2.R2Config(token_cluster="confidence", **base))
  assert sets[0] == {2} and sets[2] == set()
  # Put the argmax elsewhere so the run {1, 2, 3} survives rule 1.
  conf2 = [0.90, 0.70, 0.85, 0.85, 0.20, 0.10]
  sets, _ = one_pass(conf2, yhat, r2.R2Config(token_cluster="confidence", **base))
  assert sets[0] == {0} and sets[2] == {2}  # most confident, ties -> lowest
  sets, _ = one_pass(conf2, yhat, r2.R2Config(token_cluster="mid", **base))
  assert sets[2] == {2}  # offset floor(3 / 2) = 1 from slot 1
  cfg = r2.R2Config(token_cluster="random", **base)
  many = jax.jit(jax.vmap(lambda k: r2.r2_commit(
      jnp.ones(6, bool), jnp.asarray(conf2), jnp.asarray(yhat), r2.Tracker.empty(6), cfg,
      key=k)[0][2]))(jax.random.split(jax.random.PRNGKey(0), 300))
  many = np.asarray(many)
  assert (many.sum(axis=1) == 1).all() and not many[:, [0, 4, 5]].any()
  np.testing.assert_allclose(many.mean(axis=0)[1:4], 1 / 3, atol=0.09)  # uniform in the run
  with pytest.raises(ValueError, match="key"):
    r2.r2_commit(jnp.ones(6, bool), jnp.asarray(conf2), jnp.asarray(yhat), r2.Tracker.empty(6),
                 cfg)


def test_conf_cluster_occupancy_and_short_block():
  # Slots 0 and 1 already decoded: window [0,3) has D = 2 > u = 1 and is skipped.
  masked = [False, False, True, True, True]
  conf = [0.0, 0.0, 0.85, 0.2, 0.1]
  sets, _ = one_pass(conf, [1, 2, 3, 4, 5], r2.R2Config(tau=0.99), masked=masked)
  assert sets[0] == {2} and sets[1] == set()
  # Window [2,5): D = 1 (slot 2, by rule 1), mean(0.2, 0.1) < 0.8.
  # Block shorter than the window: rule 2 skipped.
  sets, _ = one_pass([0.5, 0.79], [1, 2], r2.R2Config(window=3))
  assert sets[1] == set()
  sets, _ = one_pass([0.5, 0.79, 0.95], [1, 2, 3], r2.R2Config(window=3, tau=0.99))
  # Window [0,3): D = 0, argmax 2 committed -> D = 1, mean(0.5, 0.79) = 0.645 < 0.8.
  assert sets[0] == {2} and sets[1] == set()


def test_config_and_flags():
  cfg = r2.R2Config.from_flags("conf,token,stability")
  assert cfg == r2.R2Config()
  cfg = r2.R2Config.from_flags("token", tau=0.8)
  assert cfg.window is None and cfg.temporal_steps is None and cfg.token_cluster == "confidence"
  assert cfg.tau == 0.8 and cfg.token_cluster_on and not cfg.conf_cluster_on
  none = r2.R2Config.from_flags("")
  assert not (none.conf_cluster_on or none.token_cluster_on or none.temporal_on)
  assert r2.R2Config.from_flags("none") == none == r2.R2Config.from_flags(" none , ")
  # "all" (what the decoding benchmark runs) turns every rule on, alone or with others.
  assert r2.R2Config.from_flags("all") == r2.R2Config() == r2.R2Config.from_flags("All,token")
  assert r2.R2Config.from_flags("all", tau=0.5).tau == 0.5
  assert r2.R2Config.from_flags("temporal,window") == r2.R2Config(token_cluster=None)
  with pytest.raises(ValueError, match="unknown rule"):
    r2.R2Config.from_flags("conf,bogus")
  with pytest.raises(ValueError, match="tau"):
    r2.R2Config(tau=1.5)
  with pytest.raises(ValueError, match="temporal_agg"):
    r2.R2Config(temporal_agg="median")
  with pytest.raises(ValueError, match="token_cluster"):
    r2.R2Config(token_cluster="left")


# R2-B script: (committed set before the pass) -> (conf, yhat) for slots 0..5.
R2B_PASSES = {
    (): ([0.97, 0.81, 0.20, 0.30, 0.40, 0.50], [1, 2, 3, 4, 5, 6]),
    (0,): ([0.5, 0.83, 0.25, 0.30, 0.45, 0.88], [1, 2, 3, 9, 5, 6]),
    (0, 5): ([0.5, 0.84, 0.70, 0.35, 0.86, 0.5], [1, 2, 3, 9, 5, 6]),
    (0, 1, 4, 5): ([0.5, 0.5, 0.75, 0.60, 0.5, 0.5], [1, 2, 3, 9, 5, 6]),
    (0, 1, 2, 4, 5): ([0.5, 0.5, 0.5, 0.65, 0.5, 0.5], [1, 2, 3, 9, 5, 6]),
}


def make_script_fn(passes, prompt_len, gen_len):
  """Scripted model: the pass is identified by which generated slots are committed."""
  keys = list(passes)
  codes = np.array([sum(1 << i for i in k) for k in keys])
  table = np.full((1 << gen_len,), -1, np.int32)
  table[codes] = np.arange(len(keys))
  conf = np.stack([np.asarray(passes[k][0]) for k in keys])
  yhat = np.stack([np.asarray(passes[k][1]) for k in keys])
  gen_logits = jnp.asarray(scripted_logits(conf, yhat))  # [n_pass, G, V]
  table = jnp.asarray(table)
  weights = jnp.asarray(1 << np.arange(gen_len), jnp.int32)

  def fn(tokens):
    code = jnp.sum((tokens[:, prompt_len:] != MASK) * weights, axis=-1)
    row = table[code]
    gl = gen_logits[jnp.maximum(row, 0)]  # [B, G, V]
    gl = jnp.where((row >= 0)[:, None, None], gl, jnp.nan)  # off-script -> NaN
    pl = jnp.zeros((tokens.shape[0], prompt_len, K + 1), jnp.float32)
    return jnp.concatenate([pl, gl], axis=1)
  return fn


@pytest.mark.parametrize("agg", ["last", "ave"])
def test_r2b_scripted_decode(agg):
  fn = make_script_fn(R2B_PASSES, prompt_len=1, gen_len=6)
  cfg = r2.R2Config(temporal_agg=agg)
  prompt = jnp.full((1, 1), 7, jnp.int32)
  res = jax.jit(lambda p: blockwise.decode_threshold(fn, p, 6, 6, 0.9, mask_id=MASK, r2=cfg))(
      prompt)
  assert int(res.nfe[0]) == 5
  np.testing.assert_array_equal(np.asarray(res.tokens[0, 1:]), [1, 2, 3, 9, 5, 6])
  np.testing.assert_array_equal(np.asarray(res.commit_step[0]), [0, 2, 3, 4, 2, 1])
  rule = np.asarray(res.commit_rule[0])
  np.testing.assert_array_equal(rule, [RULE_THRESHOLD, RULE_TEMPORAL] + [RULE_THRESHOLD] * 4)
  np.testing.assert_allclose(np.asarray(res.commit_conf[0]),
                             [0.97, 0.84, 0.75, 0.65, 0.86, 0.88], atol=1e-5)


def tiny_model(vocab=9, seed=0):
  """Deterministic token-dependent logits [B, L, V], rows independent."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  emb = jax.random.normal(k1, (vocab, 8))
  pos = jax.random.normal(k2, (64, 8))
  out = jax.random.normal(k3, (8, vocab)) * 2.5

  def fn(tokens):
    h = emb[tokens] + pos[: tokens.shape[1]]
    ctx = jnp.mean(h, axis=1, keepdims=True)
    return jnp.tanh(h + ctx) @ out
  return fn


def test_rules_off_equals_plain_threshold_and_invariants():
  fn = tiny_model()
  prompt = jax.random.randint(jax.random.PRNGKey(3), (6, 3), 1, 9)
  g, lb = 12, 4
  dec = jax.jit(lambda p, cfg: blockwise.decode_threshold(fn, p, g, lb, 0.7, mask_id=MASK,
                                                          r2=cfg), static_argnums=1)
  plain = dec(prompt, None)
  off = dec(prompt, r2.R2Config.none(tau=0.7))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(off)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  full = dec(prompt, r2.R2Config(tau=0.7, tau_spatial=0.5, tau_temporal=0.5, temporal_steps=2))
  for res in (plain, full):
    steps = np.asarray(res.commit_step)
    nfe = np.asarray(res.nfe)
    assert (steps >= 0).all()  # everything committed
    assert np.all(np.asarray(res.tokens[:, 3:]) != MASK)
    for b in range(steps.shape[0]):
      # Every pass commits >= 1 slot.
      assert set(steps[b].tolist()) == set(range(nfe[b]))
      # Blocks are finished left to right: no slot outside the active block is committed.
      blocks = steps[b].reshape(g // lb, lb)
      assert np.all(blocks.max(axis=1)[:-1] < blocks.min(axis=1)[1:])
  assert np.asarray(full.nfe).sum() <= np.asarray(plain.nfe).sum()
  assert (np.asarray(full.commit_rule) > 0).any()


def test_tau_mismatch_raises():
  with pytest.raises(ValueError, match="tau"):
    blockwise.decode_threshold(tiny_model(), jnp.ones((1, 2), jnp.int32), 4, 4, 0.8,
                               mask_id=MASK, r2=r2.R2Config(tau=0.9))


# -- every threshold rule exactly on its threshold (dyadic values: exact in float32) -------------
def test_rule1_threshold_is_inclusive():
  """Rule 1 commits c >= tau: a slot exactly at tau is committed, one just below is not."""
  cfg = r2.R2Config.none(tau=0.75)
  sets, _ = one_pass([0.875, 0.75, 0.7421875, 0.5], [1, 2, 3, 4], cfg)
  assert sets[0] == {0, 1}
  got = r2.threshold_commit(jnp.ones(4, bool), jnp.asarray([0.875, 0.75, 0.7421875, 0.5]), 0.75)
  np.testing.assert_array_equal(np.asarray(got), [True, True, False, False])
  # tau = 1 (the largest allowed) commits only the argmax unless a slot is certain.
  sets, _ = one_pass([0.875, 1.0, 0.5], [1, 2, 3], r2.R2Config.none(tau=1.0))
  assert sets[0] == {1}


def _rule2_only(tau_s=0.75, u=1):
  return r2.R2Config(tau=0.9375, window=3, tau_spatial=tau_s, max_unmasked=u,
                     token_cluster=None, temporal_steps=None)


def test_rule2_window_mean_is_inclusive():
  """Rule 2 marks a window whose masked slots average exactly tau_s (>=), not one just below.
  Rule 1 takes the argmax slot 1; window [1, 4) then holds D = 1 = u decoded slot and
  Mw = {2, 3} with mean 0.75."""
  sets, _ = one_pass([0.125, 0.875, 0.75, 0.75, 0.125, 0.125], [1, 2, 3, 4, 5, 6], _rule2_only())
  assert sets[0] == {1} and sets[1] == {2, 3}
  sets, _ = one_pass([0.125, 0.875, 0.75, 0.7421875, 0.125, 0.125], [1, 2, 3, 4, 5, 6],
                     _rule2_only())
  assert sets[0] == {1} and sets[1] == set()
  # Occupancy: D = u is allowed, D = u + 1 is not (u = 0 here, so window [1, 4) is skipped).
  sets, _ = one_pass([0.125, 0.875, 0.75, 0.75, 0.125, 0.125], [1, 2, 3, 4, 5, 6],
                     _rule2_only(u=0))
  assert sets[1] == set()



def test_rule2_windows_are_the_blocks_full_windows():
  """The windows are [s, s + w) for s = 0..Lb-w: the last one ends at the block's end, none runs
  past it, a block as long as the window is one window, and a window holding one masked slot
  averages that slot alone."""
  # Rule 1 takes slot 3; only the last window [3, 6) has D = 1 and mean 0.75.
  sets, _ = one_pass([0.125, 0.125, 0.125, 0.875, 0.75, 0.75], [1, 2, 3, 4, 5, 6], _rule2_only())
  assert sets[0] == {3} and sets[1] == {4, 5}
  # Slots 4, 5 average 0.75 but every full window holding them also holds slot 3 (0.125), so
  # nothing fires; a window [4, 7) past the block's end would (its missing slot counted as D).
  sets, _ = one_pass([0.875, 0.125, 0.125, 0.125, 0.75, 0.75], [1, 2, 3, 4, 5, 6], _rule2_only())
  assert sets[0] == {0} and sets[1] == set()
  sets, _ = one_pass([0.875, 0.75, 0.75], [1, 2, 3], _rule2_only())  # Lb = w = 3
  assert sets[0] == {0} and sets[1] == {1, 2}
  # One masked slot left in the window (slot 0 decoded before, slot 1 by rule 1: D = 2 = u).
  sets, _ = one_pass([0.125, 0.875, 0.75], [1, 2, 3], _rule2_only(u=2), masked=[False, True, True])
  assert sets[0] == {1} and sets[1] == {2}

def test_rule3_token_cluster_is_strict_and_run_length_inclusive():
  """Rule 3 needs max c > tau_s (strict) and a run of at least token_cluster_min slots."""
  base = dict(tau=0.9375, window=None, tau_spatial=0.75, temporal_steps=None)
  conf = [0.875, 0.75, 0.5, 0.125]
  yhat = [1, 2, 2, 3]
  sets, _ = one_pass(conf, yhat, r2.R2Config(**base))
  assert sets[0] == {0} and sets[2] == set()  # max c = 0.75 = tau_s: not > tau_s
  sets, _ = one_pass([0.875, 0.7578125, 0.5, 0.125], yhat, r2.R2Config(**base))
  assert sets[2] == {1}  # just above tau_s: the most confident slot of the run
  sets, _ = one_pass([0.875, 0.7578125, 0.5, 0.125], yhat,
                     r2.R2Config(token_cluster_min=3, **base))
  assert sets[2] == set()  # the run has 2 < 3 slots
  sets, _ = one_pass([0.875, 0.7578125, 0.5, 0.125], [1, 2, 2, 2],
                     r2.R2Config(token_cluster_min=3, **base))
  assert sets[2] == {1}  # 3 slots = the minimum


@pytest.mark.parametrize("agg", ["last", "ave", "max"])
def test_rule4_temporal_is_inclusive_in_count_and_confidence(agg):
  """Rule 4 commits when count >= k and agg >= tau_t: exactly k passes at exactly tau_t commit,
  k - 1 passes or a confidence just below do not."""
  cfg = r2.R2Config(tau=0.9375, window=None, token_cluster=None, temporal_steps=3,
                    tau_temporal=0.75, temporal_agg=agg)
  conf, yhat = [0.875, 0.75], [1, 2]

  def tracker(count, c_prev):
    return r2.Tracker(tok=jnp.array([-1, 2], jnp.int32), count=jnp.array([0, count], jnp.int32),
                      conf_sum=jnp.array([0.0, c_prev * count], jnp.float32),
                      conf_max=jnp.array([0.0, c_prev], jnp.float32))

  # Two earlier passes at 0.75, this one at 0.75: count 3 = k, every aggregate = 0.75 = tau_t.
  sets, tr = one_pass(conf, yhat, cfg, tracker=tracker(2, 0.75))
  assert sets[0] == {0} and sets[3] == {1}
  assert int(tr.count[1]) == 0 and int(tr.tok[1]) == -1  # cleared after the commit
  # Only one earlier pass: count 2 < k.
  sets, tr = one_pass(conf, yhat, cfg, tracker=tracker(1, 0.75))
  assert sets[3] == set() and int(tr.count[1]) == 2
  # Count 3, but the aggregate just below tau_t.
  low = 0.7421875
  sets, _ = one_pass([0.875, low], yhat, cfg, tracker=tracker(2, low))
  assert sets[3] == set()
  # A changed prediction restarts the streak at 1.
  sets, tr = one_pass([0.875, 0.75], [1, 3], cfg, tracker=tracker(2, 0.75))
  assert sets[3] == set() and int(tr.count[1]) == 1 and int(tr.tok[1]) == 3
