"""TRIMS masks inside the jitted train step, and the masking schemes a config can name.

`trims_mask_batch` draws trajectory-ranked masks from per-slot difficulty buckets (spec/trims.md):
a threshold k splits a response into the context C_k = {b <= k} (masked with p_context) and the
future F_k = {b > k} (masked with p_future). `masking_for` maps `config.trims.masking` onto a
scheme: the bucket order the data must store and the law the method applies ("standard" is the
MDLM masking law of `dlm_jax.diffusion.masked`, used by the control arms).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp

from dlm_jax.trims.buckets import check_num_buckets

K_LAWS = ("uniform", "tied_to_t")


def trims_mask_probs(buckets: jax.Array, k: Union[int, jax.Array], p_context: float = 0.05,
                     p_future: float = 0.95) -> jax.Array:
  """Per-slot masking probability under TRIMS at threshold k.

  Args:
    buckets: [..., R] int bucket ids (0 = never mask).
    k: threshold in 0..K-1 (scalar, or broadcastable to buckets[..., :1]).
    p_context: probability for the context C_k = {b <= k} (hard anchors, mostly visible).
    p_future: probability for the future F_k = {b > k}.

  Returns:
    float32 [..., R]: p_context on 1 <= b <= k, p_future on b > k, 0 on b = 0.
  """
  b = jnp.asarray(buckets).astype(jnp.int32)
  p = jnp.where(b <= k, jnp.float32(p_context), jnp.float32(p_future))
  return jnp.where(b > 0, p, jnp.float32(0.0))


def k_from_t(t: jax.Array, K: int) -> jax.Array:
  """The "tied_to_t" law: k = min(K - 1, floor((1 - t) K)) as int32 (t = 0.99 -> 0, 0.05 -> K - 1)."""
  return jnp.minimum(K - 1, jnp.floor((1.0 - t) * K)).astype(jnp.int32)


def nominal_masked_fraction(k: jax.Array, K: int, p_context: float = 0.05, p_future: float = 0.95) -> jax.Array:
  """E[masked fraction | k] with equal buckets: p_future (K - k) / K + p_context k / K (float32)."""
  kf = jnp.asarray(k, jnp.float32)
  return (p_future * (K - kf) + p_context * kf) / K


def trims_mask(key: jax.Array, buckets: jax.Array, K: int = 8, p_context: float = 0.05, p_future: float = 0.95,
               k_law: str = "uniform", t_min: float = 1e-3) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Trajectory-ranked mask of one response.

  The key splits into (k_key, u_key). k_law="uniform": k ~ U{0..K-1} from k_key and t is the nominal masked
  fraction of that k (`nominal_masked_fraction`, in [p_context, p_future]; only used by a 1/t weighting).
  k_law="tied_to_t": t ~ U(t_min, 1) from k_key and k = `k_from_t(t, K)`. Then u ~ U(0,1)^R from u_key and
  mask = (u < p) & (buckets > 0) with p from `trims_mask_probs`.

  Args:
    key: one PRNG key (typed or raw).
    buckets: [R] int bucket ids (0 = prompt/padding, never masked).
    K: number of buckets (static).
    p_context: mask probability of slots in buckets 1..k.
    p_future: mask probability of slots in buckets k+1..K.
    k_law: "uniform" or "tied_to_t" (static).
    t_min: lower end of t for "tied_to_t".

  Returns:
    (mask bool [R], k int32 scalar, t float32 scalar).
  """
  if k_law not in K_LAWS:
    raise ValueError(f"k_law must be one of {K_LAWS}, got {k_law!r}")
  check_num_buckets(K)
  k_key, u_key = jax.random.split(key)
  if k_law == "uniform":
    k = jax.random.randint(k_key, (), 0, K, dtype=jnp.int32)
    t = nominal_masked_fraction(k, K, p_context, p_future)
  else:
    t = jax.random.uniform(k_key, (), jnp.float32, minval=t_min, maxval=1.0)
    k = k_from_t(t, K)
  p = trims_mask_probs(buckets, k, p_context, p_future)
  u = jax.random.uniform(u_key, jnp.shape(buckets), jnp.float32)
  mask = (u < p) & (jnp.asarray(buckets) > 0)
  return mask, k, t


def trims_mask_batch(keys: jax.Array, buckets: jax.Array, K: int = 8, p_context: float = 0.05,
                     p_future: float = 0.95, k_law: str = "uniform",
                     t_min: float = 1e-3) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`trims_mask` vmapped over examples: keys [B], buckets [B, R] -> (mask [B, R], k [B], t [B])."""
  fn = lambda key, b: trims_mask(key, b, K, p_context, p_future, k_law, t_min)  # noqa: E731
  return jax.vmap(fn)(keys, buckets)


@dataclasses.dataclass(frozen=True)
class MaskingScheme:
  """How a `config.trims.masking`-style value maps onto bucket order and masking law.

  Attributes:
    name: the config value.
    law: "standard" (the MDLM law: t from config.diffusion.time_sampling, every maskable slot masked with
      probability 1 - alpha(t)) or "trims" (ranked: p_context / p_future around a bucket threshold k).
    bucket_order: the `assign_buckets` order the offline pipeline must store ("hard_first", "easy_first",
      "random"), or None when buckets only mark maskable slots (buckets > 0).
  """
  name: str
  law: str
  bucket_order: Optional[str]

  @property
  def needs_teacher(self) -> bool:
    """True when the stored buckets must come from teacher scores."""
    return self.bucket_order is not None


_SCHEMES = {
    # Standard MDLM SFT masking (the control arms S and S-u); buckets only mark maskable slots.
    "random": MaskingScheme("random", "standard", None),
    # TRIMS default (T-hard): hard-first buckets, ranked law.
    "trims": MaskingScheme("trims", "trims", "hard_first"),
    # Ablation T-easy: buckets reversed (K + 1 - b), same ranked law.
    "trims_easy_first": MaskingScheme("trims_easy_first", "trims", "easy_first"),
    # Ablation T-rand: hard-first labels permuted within each response (seeded by example id), same ranked law.
    "random_buckets": MaskingScheme("random_buckets", "trims", "random"),
}
_ALIASES = {"standard": "random"}


def masking_for(name: str) -> MaskingScheme:
  """The masking scheme of a config value.

  name                bucket order stored offline     law at train time
  "random"            none                            standard: the MDLM masking law
  "trims"             hard_first                      ranked: k ~ k_law, p_context on b <= k, p_future on b > k
  "trims_easy_first"  easy_first                      ranked
  "random_buckets"    random (seeded by example id)   ranked

  "standard" is accepted as an alias of "random".

  Raises:
    ValueError: naming the accepted values, for anything else.
  """
  key = _ALIASES.get(name, name)
  if key not in _SCHEMES:
    raise ValueError(f"masking must be one of {sorted(_SCHEMES)} (or 'standard'), got {name!r}")
  return _SCHEMES[key]
