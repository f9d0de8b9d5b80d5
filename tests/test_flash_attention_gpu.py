"""Pallas flash attention compiled for a real GPU (Triton, no interpret mode) vs the XLA path.

Skipped unless JAX's default backend is a GPU. tests/conftest.py defaults JAX_PLATFORMS to
cpu, so on a GPU machine run:

  JAX_PLATFORMS=cuda python -m pytest tests/test_flash_attention_gpu.py -q

The reference is `xla_attention` in float32 at 'highest' matmul precision (no TF32).
Bounds as in tests/test_flash_attention.py: relative error < 1e-5 (float32), < 2e-2 (bf16).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.kernels import flash_attention as fa
from dlm_jax.models import attention as attention_lib
from dlm_jax.models.attention import xla_attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a GPU backend (JAX_PLATFORMS=cuda)")

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(b, l, h, d, dtype, kind, seed=0):
  rng = np.random.default_rng(seed)
  seg = np.zeros((b, l), np.int32)
  for i in range(b):
    if kind == "short":
      lengths = rng.integers(1, 40, size=l)
      ids = np.repeat(np.arange(1, l + 1), lengths)[:l - l // 10]
      seg[i, :ids.size] = ids
    else:
      cuts = np.sort(rng.choice(np.arange(10, l - 40), 2, replace=False))
      seg[i, :cuts[0]], seg[i, cuts[0]:cuts[1]], seg[i, cuts[1]:l - 33] = 1, 2, 3
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = [jax.random.normal(kk, (b, l, h, d), jnp.float32).astype(dtype) for kk in ks]
  return (*x, jnp.asarray(seg))


def _out_and_grads(attend, q, k, v, ct, seg, causal):
  def run(q, k, v, ct):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg, seg, causal=causal), q, k, v)
    return (out, *vjp(ct))
  return jax.jit(run)(q, k, v, ct)


def _rel(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("b,l,h,d,dtype,kind,causal,blocks", [
    (2, 1000, 4, 64, jnp.float32, "packed", False, (None, None)),
    (2, 1000, 4, 128, jnp.float32, "packed", True, (None, None)),
    (2, 777, 4, 64, jnp.bfloat16, "short", False, (64, 32)),
    (1, 4096, 4, 128, jnp.bfloat16, "packed", True, (128, 128)),
    (4, 2048, 2, 64, jnp.bfloat16, "short", True, (None, None)),
])
def test_gpu_matches_reference(b, l, h, d, dtype, kind, causal, blocks):
  q, k, v, ct, seg = _inputs(b, l, h, d, dtype, kind)
  attend = fa.make_attention_fn(block_q=blocks[0], block_k=blocks[1])
  got = _out_and_grads(attend, q, k, v, ct, seg, causal)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    ref = _out_and_grads(xla_attention, f32(q), f32(k), f32(v), f32(ct), seg, causal)
  pad = np.asarray(seg) == 0
  for name, x, r in zip(("out", "dq", "dk", "dv"), got, ref):
    assert x.dtype == dtype
    assert np.all(np.isfinite(np.asarray(x, np.float32))), name
    err = _rel(x, r)
    assert err < TOL[dtype], f"{name}: relative error {err:.2e}"
  assert np.all(np.asarray(got[0], np.float32)[pad] == 0.0)
  assert np.all(np.asarray(got[1], np.float32)[pad] == 0.0)


def test_gpu_model_switch_uses_kernel():
  attend = attention_lib.get_attention_fn("auto")
  assert attend is not xla_attention
  q, k, v, _, seg = _inputs(2, 256, 2, 64, jnp.bfloat16, "packed")
  out = jax.jit(lambda q, k, v: attend(q, k, v, seg, seg, causal=False))(q, k, v)
  ref = xla_attention(q, k, v, seg, seg)
  assert _rel(out, ref) < TOL[jnp.bfloat16]
