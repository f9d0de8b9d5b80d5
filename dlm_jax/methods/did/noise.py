"""DID forward process: each non-BOS token survives to time t with probability alpha(t).

Spec: spec/did.md (arXiv 2603.23507). Conventions of the whole `dlm_jax.methods.did` package:

- `x0` is the clean sequence WITHOUT its BOS, `x0 [B, N]` int32 with lengths `x0_len [B]` (n_b <= N).
- `xt` is the noised sequence WITHOUT BOS, `xt [B, M]` int32 with lengths `xt_len [B]` (m_b <= M, m_b <= n_b),
  and it must be a subsequence of `x0` (see `dp.check_subsequence` / `dp.validate_inputs`).
- Gap g in {0, ..., M} means "after the first g tokens of xt"; the model input is [BOS] + xt and its output
  row r is gap g = r. Rows g > m_b and x0 slots k >= n_b are invalid and hold exact zeros (log: -inf).
- Token ids are >= 0; padding is described by the length arrays only, never by a token id.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def as_int32(*arrays) -> tuple[Array, ...]:
  """The token and length inputs of every public function, as int32 arrays."""
  return tuple(jnp.asarray(a, jnp.int32) for a in arrays)


def survival(t: Array | float, eps: float = 0.0) -> Array:
  """Survival probability alpha(t) = 1 - (1 - eps) t of a non-BOS token (same shape as `t`)."""
  return 1.0 - (1.0 - eps) * jnp.asarray(t, jnp.float32)


def loss_weight(t: Array | float) -> Array:
  """DISE/DICE time weight w(t) = sigma(t) / expm1(sigma_bar(t)) = 1 / t (any eps); same shape as `t`."""
  return 1.0 / jnp.asarray(t, jnp.float32)


def _is_single_key(key: Array) -> bool:
  """True for one PRNG key (typed key of shape [] or raw uint32 [2]), False for per-example keys."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 0
  return key.ndim == 1


@jax.jit
def forward_delete(key: Array, x0: Array, x0_len: Array, t: Array | float, eps: float = 0.0,
                   pad_value: int = 0) -> tuple[Array, Array]:
  """Samples x_t ~ q_t(. | x0): each valid token survives independently with probability alpha(t).

  Kept tokens are compacted to the left in their original order (position = cumsum(keep) - 1, scatter).

  Args:
    key: one PRNG key (typed [] or raw uint32 [2]) or per-example keys ([B] typed or [B, 2] raw).
    x0: int32 [B, N] clean tokens without BOS.
    x0_len: int32 [B] valid lengths n_b.
    t: float [] or [B] diffusion times in [0, 1].
    eps: schedule floor, alpha(1) = eps.
    pad_value: token written into slots >= xt_len.

  Returns:
    xt: int32 [B, N] kept tokens, left-aligned, padded with `pad_value`.
    xt_len: int32 [B] number of kept tokens m_b.
  """
  x0, x0_len = as_int32(x0, x0_len)
  b, n = x0.shape
  if _is_single_key(key):
    u = jax.random.uniform(key, (b, n), jnp.float32)
  else:
    u = jax.vmap(lambda k: jax.random.uniform(k, (n,), jnp.float32))(key)
  alpha = jnp.broadcast_to(survival(t, eps), (b,))
  valid = jnp.arange(n)[None, :] < x0_len[:, None]
  keep = valid & (u < alpha[:, None])
  pos = jnp.cumsum(keep, axis=1) - 1
  pos = jnp.where(keep, pos, n)  # n is out of range: dropped by the scatter
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
  xt = jnp.full((b, n), pad_value, jnp.int32).at[rows, pos].set(x0, mode="drop")
  return xt, jnp.sum(keep, axis=1).astype(jnp.int32)
