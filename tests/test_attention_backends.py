"""The attention backends JAX ships ('splash' for TPU, 'cudnn' for GPU) and 'auto' per target.

On this CPU-only machine: splash runs in Pallas's TPU interpret mode against the XLA reference
(forward and the three gradients, packed segments, padding, a fully padded row, causal, a length
that is not a multiple of its 128-wide blocks); 'auto' is resolved for meshes of abstract TPU
devices (libtpu) without a TPU; cuDNN's lowering needs the CUDA plugin and libcudnn and is skipped
otherwise. Compiled forms in a whole train step: tests/test_compile.py.
"""

import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dlm_jax import hardware
from dlm_jax.config import ConfigError
from dlm_jax.models import attention as attention_lib
from dlm_jax.models.attention import xla_attention
from tests.tiny import tiny_config

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu (pip install -e '.[dev]' or '.[tpu]')")


def _inputs(b, length, h, d, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v, ct = (jax.random.normal(kk, (b, length, h, d), jnp.float32).astype(dtype) for kk in ks)
  seg = np.ones((b, length), np.int32)
  seg[0, length // 3:] = 2                 # two packed documents ...
  seg[0, length - length // 5:] = 0        # ... then padding
  seg[1, :] = 0                            # a fully padded row
  seg[2, :7] = 5                           # a short document, then one that fills the row
  return q, k, v, ct, jnp.asarray(seg)


@pytest.mark.parametrize("causal", [False, True])
def test_splash_matches_xla_forward_and_grads(causal):
  q, k, v, ct, seg = _inputs(3, 200, 2, 64)  # 200: padded to 256 inside

  def loss(attend):
    return lambda q, k, v: jnp.sum(attend(q, k, v, seg, seg, causal=causal) * ct)

  splash = attention_lib.make_splash_attention(interpret=True)
  out = jax.jit(lambda q, k, v: splash(q, k, v, seg, seg, causal=causal))(q, k, v)
  ref = xla_attention(q, k, v, seg, seg, causal=causal)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
  assert np.all(np.asarray(out)[1] == 0.0) and np.all(np.asarray(out)[0, -(200 // 5):] == 0.0)
  got = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(xla_attention), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip(("dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=name)
    assert np.all(np.asarray(a)[1] == 0.0), f"{name} of the padded row"


@pytest.mark.parametrize("causal", [False, True])
def test_rows_with_a_key_matches_the_mask(causal):
  rng = np.random.default_rng(0)
  qs = jnp.asarray(rng.integers(0, 4, (3, 40)), jnp.int32)
  ks = jnp.asarray(rng.integers(0, 4, (3, 40)), jnp.int32)
  for a, b in ((qs, ks), (qs, qs), (jnp.zeros_like(qs), ks)):
    want = np.asarray(attention_lib.attention_mask(a, b, causal))[:, 0].any(-1)
    np.testing.assert_array_equal(attention_lib.rows_with_a_key(a, b, causal), want)


def test_auto_resolves_per_platform_and_names_every_backend():
  assert attention_lib.resolve_impl("auto", "tpu") == "splash"
  assert attention_lib.resolve_impl("auto", "gpu") == "pallas"
  assert attention_lib.resolve_impl("auto", "cpu") == "xla"
  assert set(attention_lib.names()) == {"xla", "pallas", "splash", "cudnn", "auto"}
  with pytest.raises(ConfigError, match="config.model.attention='flash'"):
    attention_lib.resolve_impl("flash")


@needs_libtpu
def test_target_platform_comes_from_the_mesh_not_the_host():
  """Compiling for a TPU on a CPU host: 'auto' must see the TPU (jax.default_backend() is 'cpu')."""
  _, devices = hardware.topology_devices("v4:2x2x1")
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  assert jax.default_backend() == "cpu"
  assert attention_lib.target_platform(mesh) == "tpu"
  with jax.set_mesh(mesh):
    assert attention_lib.target_platform() == "tpu"
    assert attention_lib.resolve_impl("auto") == "splash"
  assert attention_lib.target_platform() == "cpu"


def _cfg(**kw):
  c = tiny_config()
  c.model.attention, c.model.dtype = "cudnn", "bfloat16"
  for k, v in kw.items():
    *path, field = k.split("__")
    target = c
    for p in path:
      target = target[p]
    target[field] = v
  return c


def test_cudnn_refuses_what_it_cannot_take():
  check = lambda c: attention_lib.check_config(c.model, c)  # noqa: E731
  with pytest.raises(ConfigError, match=r"cannot take packed rows.*data.packing='pad'"):
    check(_cfg(data__packing="pack"))
  with pytest.raises(ConfigError, match=r"did.pack=False"):
    check(_cfg(data__packing="pad", method="did", did__pack=True))
  with pytest.raises(ConfigError, match=r"model.dtype='bfloat16'"):
    check(_cfg(data__packing="pad", model__dtype="float32"))
  check(_cfg(data__packing="pad"))  # one document per row: accepted
  with pytest.raises(ValueError, match="needs a GPU target"):
    attention_lib.get_attention_fn("cudnn")  # on this CPU host, nothing to fall back to


def _cudnn_lowering_available():
  if hardware.gpu_compile_available() is not None:
    return hardware.gpu_compile_available()
  try:
    found = importlib.util.find_spec("nvidia.cudnn") is not None
  except ModuleNotFoundError:
    found = False
  if not found:
    return "libcudnn is not installed (pip install nvidia-cudnn-cu12; 717 MB, not in CI)"
  return None


@pytest.mark.skipif(_cudnn_lowering_available() is not None,
                    reason=f"cuDNN attention lowering: {_cudnn_lowering_available()}")
def test_cudnn_compiles_for_an_h100():
  _, devices = hardware.topology_devices("h100:2")
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = jax.ShapeDtypeStruct((4, 256, 2, 64), jnp.bfloat16, sharding=sh)
  s = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=sh)

  def loss(q, k, v, seg):
    attend = attention_lib.get_attention_fn("cudnn")
    return jnp.sum(attend(q, k, v, seg, seg).astype(jnp.float32) ** 2)

  with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, s).compile().as_text()
  assert "__cudnn$fmha" in hlo
