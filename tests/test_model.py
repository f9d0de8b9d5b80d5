"""The denoiser: attention reference semantics, logical axis names, and the Pallas switch."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.run import experiment as exp_lib
from dlm_jax import parallel
from dlm_jax.diffusion import masked as mdlm_lib
from dlm_jax.models import attention
from dlm_jax.models.transformer import Transformer, TransformerConfig
from tests.tiny import tiny_config


def _qkv(b=2, l=12, h=2, d=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (b, l, h, d)) for k in ks]


def test_segments_never_attend_across():
  q, k, v = _qkv()
  seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])
  out = attention.xla_attention(q, k, v, seg, seg)
  # Changing the second document's keys/values must not change the first document's output.
  v2 = v.at[0, 5:9].add(10.0)
  k2 = k.at[0, 5:9].add(3.0)
  out2 = attention.xla_attention(q, k2, v2, seg, seg)
  np.testing.assert_allclose(out[0, :5], out2[0, :5], rtol=1e-6)
  assert not np.allclose(out[0, 5:9], out2[0, 5:9])
  # Padding rows give exact zeros, never NaN.
  assert np.all(np.asarray(out[0, 9:]) == 0.0)
  g = jax.grad(lambda q: jnp.sum(attention.xla_attention(q, k, v, seg, seg)))(q)
  assert np.all(np.isfinite(g))


def test_causal_mask():
  q, k, v = _qkv(b=1)
  seg = jnp.ones((1, 12), jnp.int32)
  out = attention.xla_attention(q, k, v, seg, seg, causal=True)
  v2 = v.at[0, 6:].add(5.0)
  out2 = attention.xla_attention(q, k, v2, seg, seg, causal=True)
  np.testing.assert_allclose(out[0, :6], out2[0, :6], rtol=1e-6)


def test_bidirectional_model_sees_the_future_and_causal_does_not():
  for causal in (False, True):
    cfg = TransformerConfig(vocab_size=11, num_layers=1, d_model=16, num_heads=2, causal=causal)
    m = Transformer(cfg)
    toks = jnp.arange(8)[None] % 11
    params = m.init(jax.random.key(0), toks)
    a, _ = m.apply(params, toks)
    b, _ = m.apply(params, toks.at[0, 7].set(3))
    changed = not np.allclose(a[0, 0], b[0, 0])
    assert changed == (not causal)



def test_causal_model_at_each_position_is_the_bidirectional_model_on_the_prefix():
  """One block: a causal transformer's output at position i is what the same weights give,
  without the causal mask, on the prefix x[:i+1] at its last position: every query sees itself
  and every earlier key, nothing later. (A mask that left out the diagonal, or let a query see
  its successor, breaks this at every position. With more blocks the prefix run's earlier
  positions would see later ones, so the identity holds for one block only.) The eight prefixes
  run as one batch of the bidirectional model, row i with x[i+1:] in a second segment (so the
  causal branch of the mask is not used by the reference), same positions: one compile."""
  cfg = TransformerConfig(vocab_size=11, num_layers=1, d_model=16, num_heads=2,
                          max_len=8, causal=True)
  bidir = TransformerConfig(**dict(vars(cfg), causal=False))
  toks = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6]])
  n = toks.shape[1]
  params = jax.jit(Transformer(cfg).init)(jax.random.key(1), toks)
  out, _ = jax.jit(Transformer(cfg).apply)(params, toks)
  seg = jnp.where(jnp.arange(n)[None, :] <= jnp.arange(n)[:, None], 1, 2).astype(jnp.int32)
  ref, _ = jax.jit(Transformer(bidir).apply)(params, jnp.repeat(toks, n, axis=0), segment_ids=seg)
  for i in range(n):
    np.testing.assert_allclose(out[0, i], ref[i, i], rtol=2e-5, atol=2e-5, err_msg=f"position {i}")


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_the_model_knows_where_each_token_is(pos):
  """A bidirectional model without positions would be permutation-equivariant; with RoPE or a
  learned table, swapping two tokens changes more than the swapped rows."""
  cfg = TransformerConfig(vocab_size=11, num_layers=1, d_model=16, num_heads=2, max_len=8,
                          position_embedding=pos)
  m = Transformer(cfg)
  toks = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
  params = m.init(jax.random.key(0), toks)
  assert ("pos_embed" in params["params"]) == (pos == "learned")
  a, _ = m.apply(params, toks)
  b, _ = m.apply(params, toks[:, ::-1])
  assert not np.allclose(a[0], b[0, ::-1], atol=1e-4)
  shifted, _ = m.apply(params, toks, positions=jnp.arange(8)[None] // 2)
  assert not np.allclose(a, shifted, atol=1e-4)


def test_params_carry_logical_axis_names():
  import flax.linen as nn
  cfg = TransformerConfig(vocab_size=11, num_layers=1, d_model=16, num_heads=2,
                          time_conditioning=True)
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                                       t=jnp.ones((1,))))
  specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec))
  assert specs and all(len(s) > 0 for s in specs)
  names = {n for s in specs for n in s if n}
  assert {"embed", "vocab", "heads", "mlp"} <= names


def test_bad_attention_setting_names_the_field():
  with pytest.raises(ValueError, match="config.model.attention"):
    attention.resolve_impl("flash")
  assert attention.resolve_impl("auto") == "xla"  # CPU


def test_pallas_train_step_matches_xla(caplog):
  """A whole MDLM loss + gradient with attention='pallas' (interpret mode on CPU) == 'xla'."""
  caplog.set_level(logging.WARNING)
  out = {}
  for impl in ("xla", "pallas"):
    cfg = tiny_config()
    cfg.model.attention = impl
    cfg.model.d_model, cfg.model.num_heads, cfg.model.num_layers = 128, 2, 1  # head dim 64
    cfg.data.seq_len = 48  # not a multiple of the kernel's blocks
    cfg.train.global_batch_size = 8
    exp = exp_lib.Experiment.create(cfg)
    local = next(exp_lib.make_train_iterator(exp.config, exp.tokenizer))
    batch = parallel.global_batch_from_local(local, exp.mesh)
    batch["example_id"] = jnp.arange(8)
    state = exp.init_state(0)
    f = jax.jit(jax.value_and_grad(lambda p, b: exp.method.train_loss(p, b, jax.random.key(1))[0]))
    loss, grads = parallel.in_sharding_context(f, exp.mesh)(state.params, batch)
    out[impl] = (float(loss), jax.device_get(grads))
  assert out["pallas"][0] == pytest.approx(out["xla"][0], rel=1e-5)
  for a, b in zip(jax.tree.leaves(out["xla"][1]), jax.tree.leaves(out["pallas"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


# 768: sparse head; 64: overflow -> dense branch; tied: the kernel is the scaled embedding.
@pytest.mark.parametrize("budget,tied", [(768, False), (64, False), (768, True)])
def test_sparse_output_head_gives_the_exact_loss(budget, tied, monkeypatch):
  from dlm_jax.methods import mdlm as mdlm_method
  cfg = tiny_config()
  cfg.model.tie_embeddings = tied
  cfg.train.global_batch_size = 32
  cfg.mesh.data = 1
  exp = exp_lib.Experiment.create(cfg, mesh=parallel.make_mesh(cfg.mesh, jax.devices()[:1]))
  local = next(exp_lib.make_train_iterator(exp.config, exp.tokenizer))
  batch = {k: jnp.asarray(v) for k, v in local.items()}
  batch["example_id"] = jnp.arange(32)
  params = exp.init_state(0).params

  def run(b):
    monkeypatch.setattr(mdlm_method, "head_budget", lambda *_, **__: b)
    f = jax.jit(jax.value_and_grad(
        lambda p: exp.method.train_loss(p, batch, jax.random.key(3))[0]))
    return f(params)

  l_sparse, g_sparse = run(budget)
  l_dense, g_dense = run(32 * 32)  # budget == B * L: the plain dense path
  assert float(l_sparse) == pytest.approx(float(l_dense), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g_sparse), jax.tree.leaves(g_dense)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("budget,with_bias", [(24, True), (8, True), (64, False)])
def test_fused_masked_head_matches_autodiff_of_the_plain_head(budget, with_bias):
  """24: sparse (13 scored rows); 8: overflow -> dense branch; 64 >= N: always dense."""
  from dlm_jax.models import output_head
  n, d, v, mask_id = 64, 16, 37, 36
  ks = jax.random.split(jax.random.key(0), 5)
  h = jax.random.normal(ks[0], (n, d))
  kernel = jax.random.normal(ks[1], (d, v)) * 0.3
  bias = jax.random.normal(ks[2], (v,)) if with_bias else None
  targets = jax.random.randint(ks[3], (n,), 0, v - 1)
  weights = jnp.where(jnp.arange(n) % 5 == 0, jax.random.uniform(ks[4], (n,)) + 0.5, 0.0)

  def plain(h, kernel, bias, weights):
    logits = h @ kernel + (0.0 if bias is None else bias)
    return jnp.sum(weights * mdlm_lib.masked_cross_entropy(logits, targets, mask_id))

  def fused(h, kernel, bias, weights):
    return output_head.masked_head_nll(h, kernel, bias, targets, weights, budget, mask_id)

  argnums = (0, 1, 2, 3) if with_bias else (0, 1, 3)
  want = jax.value_and_grad(plain, argnums=argnums)(h, kernel, bias, weights)
  got = jax.jit(jax.value_and_grad(fused, argnums=argnums))(h, kernel, bias, weights)
  assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-5)
  scored = np.asarray(weights) != 0
  for a, b in zip(got[1][:-1], want[1][:-1]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got[1][-1])[scored], np.asarray(want[1][-1])[scored],
                             rtol=1e-5)
  # Unscored rows get exactly zero gradient.
  np.testing.assert_array_equal(np.asarray(got[1][0])[np.asarray(weights) == 0], 0.0)


def test_ar_sampler_keeps_the_prompt_is_reproducible_and_compiled_once():
  cfg = tiny_config(method="ar")
  cfg.mesh.data = 1
  exp = exp_lib.Experiment.create(cfg, mesh=parallel.make_mesh(cfg.mesh, jax.devices()[:1]))
  params = exp.init_state(0).params
  s = cfg.sample.copy_and_resolve_references()
  s.batch_size, s.gen_len = 2, 6
  prompt = jnp.asarray([[exp.tokenizer.bos_id, 70, 71]] * 2, jnp.int32)
  a = exp.method.sample(params, jax.random.key(0), s, prompt)
  b = exp.method.sample(params, jax.random.key(0), s, prompt)
  c = exp.method.sample(jax.tree.map(lambda x: x * 1.5, params), jax.random.key(1), s, prompt)
  assert a["tokens"].shape == (2, 9) and np.all(np.asarray(a["tokens"])[:, :3] == prompt)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert not np.any(np.asarray(a["tokens"])[:, 3:] == exp.tokenizer.mask_id)
  assert not np.array_equal(a["tokens"], c["tokens"])
  assert len(exp.method._sampler_cache) == 1  # new params and keys reuse the compiled sampler
