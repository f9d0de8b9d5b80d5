"""Pallas flash attention vs the XLA reference, in Pallas interpret mode on CPU.

Error bounds (relative Frobenius error ||x - ref|| / ||ref|| on the output and on dq, dk, dv):
  float32: < 1e-5.
  bfloat16: < BF16_TOL = 2e-2 against the float32 reference computed from the same (bf16)
    inputs; the bf16 XLA path itself is held to the same bound. Both paths round the
    probabilities to bf16 before the PV product and round the output to bf16.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dlm_jax.kernels import flash_attention as fa
from dlm_jax.models import attention as attention_lib
from dlm_jax.models.attention import xla_attention

F32_TOL = 1e-5
BF16_TOL = 2e-2
# Interpret-mode kernels are compile-bound on CPU: cheaper XLA optimisation halves test time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _segments(batch: int, length: int, kind: str, seed: int = 0) -> np.ndarray:
  """[B, L] int32 segment ids: 'one', 'packed' (3 documents + padding), 'short', 'padrow'."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((batch, length), np.int32)
  for b in range(batch):
    if kind == "one":
      seg[b] = 1
    elif kind == "short":  # Many 1..6-token documents, padding at the end.
      pos, doc = 0, 1
      while pos < length - 7:
        n = int(rng.integers(1, 7))
        seg[b, pos:pos + n] = doc
        pos, doc = pos + n, doc + 1
    else:  # 'packed' and 'padrow': three documents then padding.
      cuts = sorted(rng.choice(np.arange(5, length - 10), 2, replace=False))
      seg[b, :cuts[0]] = 1
      seg[b, cuts[0]:cuts[1]] = 2
      seg[b, cuts[1]:length - 9] = 3
  if kind == "padrow":
    seg[-1] = 0  # A whole example of padding.
  return seg


def _inputs(b, lq, lk, h, d, dtype, seg_kind, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, lq, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, lk, h, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, lk, h, d), jnp.float32).astype(dtype)
  ct = jax.random.normal(ks[3], (b, lq, h, d), jnp.float32).astype(dtype)
  q_seg = jnp.asarray(_segments(b, lq, seg_kind, seed))
  kv_seg = q_seg if lq == lk else jnp.asarray(_segments(b, lk, seg_kind, seed + 1))
  return q, k, v, q_seg, kv_seg, ct


def _out_and_grads(attend, q, k, v, q_seg, kv_seg, ct, causal):
  """(out, dq, dk, dv) for the cotangent ct, in one jit."""
  def run(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, q_seg, kv_seg, causal=causal), q, k, v)
    return (out, *vjp(ct))
  return jax.jit(run, compiler_options=FAST_COMPILE)(q, k, v)


def _rel(x, ref) -> float:
  x = np.asarray(x, np.float32)
  ref = np.asarray(ref, np.float32)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _check(results, refs, tol):
  for name, x, ref in zip(("out", "dq", "dk", "dv"), results, refs):
    assert np.all(np.isfinite(np.asarray(x, np.float32))), name
    err = _rel(x, ref)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


CASES = [
    # id, backend, B, Lq, Lk, H, D, segments, causal, block_q, block_k
    ("packed_len_not_multiple", "gpu", 2, 200, 200, 2, 64, "packed", False, 64, 32),
    ("one_segment_d128", "gpu", 1, 96, 96, 1, 128, "one", False, 32, 32),
    ("short_segments_causal", "gpu", 1, 128, 128, 1, 64, "short", True, 32, 32),
    ("cross_lengths_padrow", "gpu", 2, 72, 150, 1, 64, "padrow", False, 32, 64),
    ("tpu_causal_packed", "tpu", 1, 200, 200, 1, 64, "packed", True, 128, 128),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_float32(case):
  _, backend, b, lq, lk, h, d, seg_kind, causal, bq, bk = case
  q, k, v, q_seg, kv_seg, ct = _inputs(b, lq, lk, h, d, jnp.float32, seg_kind)

  def attend(*args, causal):
    return fa.flash_attention(*args, causal=causal, block_q=bq, block_k=bk, backend=backend,
                              interpret=True)

  got = _out_and_grads(attend, q, k, v, q_seg, kv_seg, ct, causal)
  ref = _out_and_grads(xla_attention, q, k, v, q_seg, kv_seg, ct, causal)
  _check(got, ref, F32_TOL)
  # Padded query rows (segment id 0) give exactly zero output and zero dq.
  pad = np.asarray(q_seg) == 0
  assert np.all(np.asarray(got[0])[pad] == 0.0)
  assert np.all(np.asarray(got[1])[pad] == 0.0)


def test_matches_reference_bfloat16():
  q, k, v, q_seg, kv_seg, ct = _inputs(2, 200, 200, 2, 64, jnp.bfloat16, "packed")

  def attend(*args, causal):
    return fa.flash_attention(*args, causal=causal, block_q=64, block_k=32, backend="gpu",
                              interpret=True)

  got = _out_and_grads(attend, q, k, v, q_seg, kv_seg, ct, False)
  f32 = lambda xs: [x.astype(jnp.float32) for x in xs]
  ref = _out_and_grads(xla_attention, *f32((q, k, v)), q_seg, kv_seg, ct.astype(jnp.float32),
                       False)
  assert all(x.dtype == jnp.bfloat16 for x in got)
  _check(got, ref, BF16_TOL)
  xla_bf16 = _out_and_grads(xla_attention, q, k, v, q_seg, kv_seg, ct, False)
  _check(xla_bf16, ref, BF16_TOL)  # The documented bound also holds for the XLA path.


def test_fully_padded_example_zero_and_finite():
  q, k, v, q_seg, kv_seg, ct = _inputs(2, 64, 64, 1, 64, jnp.float32, "one")
  q_seg = q_seg.at[1].set(0)
  kv_seg = kv_seg.at[1].set(0)
  attend = lambda *a, causal: fa.flash_attention(*a, causal=causal, block_q=32, block_k=32,
                                                 backend="gpu", interpret=True)
  out, dq, dk, dv = _out_and_grads(attend, q, k, v, q_seg, kv_seg, ct, True)
  for x in (out, dq, dk, dv):
    assert np.all(np.isfinite(np.asarray(x)))
    assert np.all(np.asarray(x)[1] == 0.0)


def test_bad_inputs_raise():
  q = k = v = np.zeros((1, 32, 1, 64), np.float32)
  seg = np.ones((1, 32), np.int32)
  kw = dict(backend="gpu", interpret=True)
  with pytest.raises(ValueError, match=r"head dim D=96.*\(64, 128\)"):
    x = np.zeros((1, 32, 1, 96), np.float32)
    fa.flash_attention(x, x, x, seg, seg, **kw)
  with pytest.raises(ValueError, match=r"dtype.*float16.*float32"):
    x = q.astype(np.float16)
    fa.flash_attention(x, x, x, seg, seg, **kw)
  with pytest.raises(ValueError, match=r"block_q=100.*power of two"):
    fa.flash_attention(q, k, v, seg, seg, block_q=100, **kw)
  with pytest.raises(ValueError, match=r"block_k=64.*multiple of 128"):
    fa.flash_attention(q, k, v, seg, seg, block_k=64, backend="tpu", interpret=True)
  with pytest.raises(ValueError, match=r"segment ids"):
    fa.flash_attention(q, k, v, seg[:, :16], seg, **kw)
  with pytest.raises(ValueError, match=r"backend='cuda'"):
    fa.flash_attention(q, k, v, seg, seg, backend="cuda", interpret=True)
  with pytest.raises(ValueError, match=r"interpret=True"):
    fa.flash_attention(q, k, v, seg, seg)  # CPU, no interpret mode.
  with pytest.raises(ValueError, match=r"block_k=48"):
    attention_lib.make_pallas_attention(block_k=48, backend="gpu", interpret=True)
  attend = attention_lib.make_pallas_attention(backend="gpu", interpret=True)
  with pytest.raises(ValueError, match=r"head dim D=32"):
    x = np.zeros((1, 32, 1, 32), np.float32)
    attend(x, x, x, seg, seg)


def test_fallback_to_xla(caplog):
  with caplog.at_level(logging.WARNING):
    assert attention_lib.make_pallas_attention(fallback_ok=True, block_q=100, backend="gpu",
                                interpret=True) is xla_attention
    assert attention_lib.make_pallas_attention(fallback_ok=True) is xla_attention  # CPU: no GPU/TPU.
  assert "falling back to XLA" in caplog.text
  # An unsupported head dim at call time falls back too, with the reference's result.
  attend = attention_lib.make_pallas_attention(fallback_ok=True, backend="gpu", interpret=True)
  q, k, v, seg, _, _ = _inputs(1, 24, 24, 2, 32, jnp.float32, "packed")
  with caplog.at_level(logging.WARNING):
    out = jax.jit(lambda *a: attend(*a, causal=True))(q, k, v, seg, seg)
  assert "head dim D=32" in caplog.text
  ref = jax.jit(lambda *a: xla_attention(*a, causal=True))(q, k, v, seg, seg)
  np.testing.assert_array_equal(out, ref)
  # The model's switch: 'auto' is XLA on CPU.
  assert attention_lib.get_attention_fn("auto") is xla_attention


def test_shard_map_on_8_devices_matches_single_device():
  devices = np.array(jax.devices()[:8])
  assert devices.size == 8, "tests/conftest.py should give 8 fake CPU devices"
  mesh = jax.sharding.Mesh(devices.reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  q, k, v, seg, _, ct = _inputs(4, 64, 64, 2, 64, jnp.float32, "packed", seed=3)
  attend = attention_lib.make_pallas_attention(block_q=32, block_k=32, backend="gpu", interpret=True)

  x_sharding = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  s_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
  args = [jax.device_put(x, x_sharding) for x in (q, k, v)]
  seg_s = jax.device_put(seg, s_sharding)
  ct_s = jax.device_put(ct, x_sharding)

  def run(q, k, v, seg, ct):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg, seg, causal=False), q, k, v)
    return (out, *vjp(ct))

  with jax.set_mesh(mesh):
    step = jax.jit(run, in_shardings=(x_sharding,) * 3 + (s_sharding, x_sharding),
                   out_shardings=x_sharding, compiler_options=FAST_COMPILE)
    jaxpr = str(step.trace(*args, seg_s, ct_s).jaxpr)
    sharded = step(*args, seg_s, ct_s)
  assert "shard_map" in jaxpr
  # No mesh: one kernel over the whole batch.
  single = jax.jit(run, compiler_options=FAST_COMPILE)(q, k, v, seg, ct)
  for x, y in zip(sharded, single):
    assert x.sharding.is_equivalent_to(x_sharding, 4)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
  _check(sharded, _out_and_grads(xla_attention, q, k, v, seg, seg, ct, False), F32_TOL)


@pytest.mark.parametrize("platform,backend,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                     ("cuda", "gpu", "triton")])
def test_ahead_of_time_lowering(platform, backend, marker):
  """Forward + backward lower to Mosaic (TPU) / Triton (GPU) custom calls without the hardware."""
  x = jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)

  def loss(q, k, v, seg):
    out = fa.flash_attention(q, k, v, seg, seg, causal=True, backend=backend)
    return jnp.sum(out.astype(jnp.float32))

  lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(x, x, x, seg).lower(
      lowering_platforms=(platform,))
  assert lowered.as_text().count(marker) >= 3  # forward, dq, dkv kernels.
