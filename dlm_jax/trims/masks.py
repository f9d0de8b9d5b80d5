"""TRIMS: teacher-ranked masking for masked-diffusion SFT (spec/trims.md).

Pure functions only; nothing here knows about files, flags, meshes or models.

Offline (host, numpy), once per dataset:
  1. `teacher_token_nll` / `teacher_token_entropy` score every response token with a causal teacher
     (one teacher-forced forward; `teacher_response_scores` is the prompt/response convenience form).
  2. `assign_buckets` turns the scores of each response into K per-response quantile buckets
     (1 = hardest, K = easiest, 0 = never mask: prompt and padding). Stored with the data as int8.

Inside the jitted train step (jax.numpy):
  3. `example_keys` derives one key per example from (base_key, step, global example id), so masks do not
     depend on device count, sharding or batch order.
  4. `trims_mask_batch` (TRIMS law) or `standard_mask_batch` (MDLM law) draws the masks; `masking_for` maps a
     config value onto one of them; `sft_loss` is the masked cross-entropy.

Evaluation: `aup` (accuracy under parallelism, d3LLM definition) and `reveal_rank_correlation`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

BUCKET_ORDERS = ("hard_first", "easy_first", "random")
K_LAWS = ("uniform", "tied_to_t")
WEIGHTINGS = ("uniform", "inv_t")
NORMALIZATIONS = ("token", "sequence")

ArrayLike = Union[np.ndarray, jax.Array, Sequence[float]]


# ---------------------------------------------------------------------------------------------------------------
# Buckets (offline, host side)
# ---------------------------------------------------------------------------------------------------------------


def _check_order(order: str) -> None:
  if order not in BUCKET_ORDERS:
    raise ValueError(f"bucket order must be one of {BUCKET_ORDERS}, got {order!r}")


def _check_k(K: int) -> None:
  if not isinstance(K, (int, np.integer)) or K < 1 or K > 127:
    raise ValueError(f"K (number of buckets) must be an int in 1..127 (buckets are int8), got {K!r}")


def assign_buckets(scores: ArrayLike, valid: Optional[ArrayLike] = None, K: int = 8,
                   order: str = "hard_first",
                   seed: Union[int, Sequence[int], np.ndarray, None] = None) -> np.ndarray:
  """Per-response quantile buckets of teacher difficulty (numpy, host side).

  Valid slots are ranked by the key (-score, slot) ascending: hardest first, and on ties the earlier slot counts as
  harder. With rank q in 0..R_v-1 (R_v = number of valid slots of the response), the hard-first bucket is
  b = 1 + floor(K q / R_v): bucket 1 is the hardest, K the easiest, sizes differ by at most one.

  Args:
    scores: [R] or [B, R] float difficulty (teacher NLL or entropy; larger = harder).
    valid: same shape, bool; True on response slots that may be masked (EOS fill included). None = all valid.
    K: number of buckets.
    order: "hard_first" (b as above), "easy_first" (K + 1 - b) or "random" (a uniformly random permutation of the
      hard-first labels among the valid slots of each response, drawn from `np.random.default_rng(seed)`).
    seed: only for order="random": the stable example id, an int for [R] input or a sequence [B] for [B, R].

  Returns:
    int8 array of the shape of `scores`: 1..K on valid slots, 0 elsewhere.

  Raises:
    ValueError: on a bad K/order, mismatched shapes, NaN scores on valid slots or a missing seed for "random".
  """
  _check_k(K)
  _check_order(order)
  d = np.asarray(scores, dtype=np.float64)
  if d.ndim not in (1, 2):
    raise ValueError(f"scores must be [R] or [B, R], got shape {d.shape}")
  v = np.ones(d.shape, bool) if valid is None else np.asarray(valid, dtype=bool)
  if v.shape != d.shape:
    raise ValueError(f"valid has shape {v.shape}, scores has shape {d.shape}")
  if np.isnan(d[v]).any():
    raise ValueError("scores contain NaN on valid slots")
  squeeze = d.ndim == 1
  d2, v2 = np.atleast_2d(d), np.atleast_2d(v)
  n_rows, r = d2.shape
  idx = np.broadcast_to(np.arange(r), d2.shape)
  # np.lexsort sorts by the last key first: invalid slots last, then -score ascending, then slot index.
  sort_order = np.lexsort((idx, np.where(v2, -d2, 0.0), ~v2), axis=-1)
  rank = np.empty_like(sort_order)
  np.put_along_axis(rank, sort_order, idx, axis=-1)
  r_v = v2.sum(-1, keepdims=True)
  b = 1 + (K * rank) // np.maximum(r_v, 1)
  b = np.where(v2, b, 0)
  if order == "easy_first":
    b = np.where(v2, K + 1 - b, 0)
  elif order == "random":
    if seed is None:
      raise ValueError("order='random' needs seed = the example id (an int, or [B] ids for [B, R] scores)")
    seeds = np.atleast_1d(np.asarray(seed))
    if seeds.shape != (n_rows,) or (squeeze and np.ndim(seed) != 0):
      raise ValueError(f"order='random' needs one seed per response: got seed shape {np.shape(seed)} "
                       f"for scores of shape {d.shape}")
    for row in range(n_rows):
      rng = np.random.default_rng(int(seeds[row]))
      b[row, v2[row]] = rng.permutation(b[row, v2[row]])
  out = b.astype(np.int8)
  return out[0] if squeeze else out


def assign_buckets_jnp(scores: jax.Array, valid: Optional[jax.Array] = None, K: int = 8,
                       order: str = "hard_first") -> jax.Array:
  """jax.numpy twin of `assign_buckets` for "hard_first" / "easy_first" (same labels, jit-able, K static).

  Scores are compared in float32 here (float64 on the host), so scores equal only in float32 tie differently.

  Args:
    scores: [..., R] float difficulty.
    valid: [..., R] bool, or None for all valid.
    K: number of buckets (static).
    order: "hard_first" or "easy_first" ("random" is host-only: use `assign_buckets`).

  Returns:
    int8 [..., R]: 1..K on valid slots, 0 elsewhere.
  """
  _check_k(K)
  if order not in ("hard_first", "easy_first"):
    raise ValueError(f"assign_buckets_jnp supports order 'hard_first' or 'easy_first', got {order!r}")
  d = jnp.asarray(scores, jnp.float32)
  v = jnp.ones(d.shape, bool) if valid is None else jnp.asarray(valid, bool)
  r = d.shape[-1]
  # Stable sort on (invalid, -score): ties keep slot order, so the earlier slot counts as harder.
  key = jnp.where(v, -d, 0.0)
  idx = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32), d.shape)
  sort_order = jnp.lexsort((idx, key, ~v), axis=-1)
  rank = jnp.zeros(d.shape, jnp.int32)
  rank = jnp.put_along_axis(rank, sort_order, idx, axis=-1, inplace=False)
  r_v = jnp.maximum(v.sum(-1, keepdims=True), 1).astype(jnp.int32)
  b = 1 + (K * rank) // r_v
  if order == "easy_first":
    b = K + 1 - b
  return jnp.where(v, b, 0).astype(jnp.int8)


def bucket_sizes(buckets: ArrayLike, K: int) -> np.ndarray:
  """Counts per bucket 1..K of one response ([R]) or summed over responses ([B, R]) -> int64 [K]."""
  b = np.asarray(buckets).ravel()
  return np.bincount(b[b > 0].astype(np.int64), minlength=K + 1)[1:K + 1]


# ---------------------------------------------------------------------------------------------------------------
# Keys and masks (inside the jitted step)
# ---------------------------------------------------------------------------------------------------------------


def example_keys(base_key: jax.Array, step: Union[int, jax.Array], example_ids: jax.Array) -> jax.Array:
  """One key per example: fold_in(fold_in(base_key, step), example_id).

  Args:
    base_key: a typed key (`jax.random.key`) or a raw uint32 key.
    step: int32 scalar, may be traced.
    example_ids: [B] int32 stable global example ids (never the position in a local batch).

  Returns:
    keys [B] (typed) or [B, 2] (raw), depending only on (base_key, step, example_id).
  """
  step_key = jax.random.fold_in(base_key, step)
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.asarray(example_ids, jnp.int32))


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
  _check_k(K)
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


def standard_mask(key: jax.Array, maskable: jax.Array, t_min: float = 1e-3) -> tuple[jax.Array, jax.Array]:
  """MDLM SFT masking of one response: t ~ U(t_min, 1), each maskable slot masked with probability t.

  Args:
    key: one PRNG key; splits into (t_key, u_key).
    maskable: [R] bool (response slots; prompt and padding False).
    t_min: smallest t.

  Returns:
    (mask bool [R], t float32 scalar).
  """
  t_key, u_key = jax.random.split(key)
  t = jax.random.uniform(t_key, (), jnp.float32, minval=t_min, maxval=1.0)
  u = jax.random.uniform(u_key, jnp.shape(maskable), jnp.float32)
  return (u < t) & jnp.asarray(maskable, bool), t


def standard_mask_batch(keys: jax.Array, maskable: jax.Array, t_min: float = 1e-3) -> tuple[jax.Array, jax.Array]:
  """`standard_mask` vmapped: keys [B], maskable [B, R] -> (mask [B, R], t [B])."""
  return jax.vmap(lambda key, m: standard_mask(key, m, t_min))(keys, maskable)


@dataclasses.dataclass(frozen=True)
class MaskingScheme:
  """How a `config.trims.masking`-style value maps onto bucket order and masking law.

  Attributes:
    name: the config value.
    law: "standard" (MDLM: t ~ U(t_min, 1), every maskable slot with prob t) or "trims" (ranked, p_context/p_future).
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

  def apply(self, keys: jax.Array, buckets: jax.Array, K: int = 8, p_context: float = 0.05, p_future: float = 0.95,
            k_law: str = "uniform", t_min: float = 1e-3) -> tuple[jax.Array, jax.Array]:
    """Masks for a batch: keys [B], buckets [B, R] int8 -> (mask bool [B, R], t float32 [B])."""
    if self.law == "standard":
      return standard_mask_batch(keys, jnp.asarray(buckets) > 0, t_min)
    mask, _, t = trims_mask_batch(keys, buckets, K, p_context, p_future, k_law, t_min)
    return mask, t


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
  "random"            none (buckets > 0 = maskable)   standard: t ~ U(t_min, 1), each slot masked w.p. t
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


# ---------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------


def sft_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array, t: jax.Array, weighting: str = "uniform",
             normalize: str = "token", valid: Optional[jax.Array] = None,
             mask_id: Optional[int] = None) -> tuple[jax.Array, dict]:
  """Masked cross-entropy for diffusion SFT (float32 whatever the logits dtype).

  CE[b, l] = -log softmax(logits[b, l])[targets[b, l]], read on masked slots only. With `mask_id` the [MASK]
  column is set to -inf first (SUBS); otherwise the caller has done it. Reductions (sums are over the global batch):
    weighting="uniform": ell_b = sum_l mask CE; denominators count MASKED slots:
      "token"    -> sum_b ell_b / sum_{b,l} mask              (TRIMS default: mean CE over masked slots)
      "sequence" -> mean over b of ell_b / max(1, sum_l mask[b])
    weighting="inv_t": ell_b = (1/t_b) sum_l mask CE (an ELBO-style estimate); denominators count VALID slots:
      "token"    -> sum_b ell_b / sum_{b,l} valid               (mdlm.md "token")
      "sequence" -> mean over b of ell_b / max(1, n_b), n_b = sum_l valid[b]   (LLaDA SFT form, arm S)
  A batch with nothing masked gives loss 0, never NaN.

  Args:
    logits: [B, L, V] any float dtype.
    targets: [B, L] int clean tokens.
    mask: [B, L] bool, True where the input was masked (only maskable slots).
    t: [B] float, the noise level of each example (used by "inv_t").
    weighting: "uniform" or "inv_t".
    normalize: "token" or "sequence".
    valid: [B, L] bool maskable slots (response, EOS fill included); None = every position. Used by "inv_t".
    mask_id: optional id of [MASK] whose logit column is removed.

  Returns:
    (loss scalar float32, aux) with aux = {"nll_sum": weighted CE sum, "ce_sum": unweighted masked CE sum,
    "num_masked", "token_count" (valid count), "ce" (mean masked CE), "accuracy" (top-1 on masked slots),
    "per_seq" [B] (ell_b)}.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
  f = logits.astype(jnp.float32)
  if mask_id is not None:
    f = f.at[..., mask_id].set(-jnp.inf)
  logp = jax.nn.log_softmax(f, axis=-1)
  tgt = jnp.asarray(targets, jnp.int32)
  ce = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
  m = jnp.asarray(mask, bool)
  ce = jnp.where(m, ce, 0.0)  # also removes -inf * 0 at unmasked slots
  mf = m.astype(jnp.float32)
  validf = jnp.ones(mf.shape, jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
  ce_seq = ce.sum(-1)
  n_masked_seq = mf.sum(-1)
  if weighting == "inv_t":
    ell = ce_seq / jnp.asarray(t, jnp.float32)
    denom_seq = validf.sum(-1)
  else:
    ell = ce_seq
    denom_seq = n_masked_seq
  if normalize == "token":
    loss = ell.sum() / jnp.maximum(denom_seq.sum(), 1.0)
  else:
    loss = jnp.mean(ell / jnp.maximum(denom_seq, 1.0))
  num_masked = mf.sum()
  correct = (jnp.argmax(f, axis=-1) == tgt) & m
  aux = {
      "nll_sum": ell.sum(),
      "ce_sum": ce_seq.sum(),
      "num_masked": num_masked,
      "token_count": validf.sum(),
      "ce": ce_seq.sum() / jnp.maximum(num_masked, 1.0),
      "accuracy": correct.sum() / jnp.maximum(num_masked, 1.0),
      "per_seq": ell,
  }
  return loss, aux


# ---------------------------------------------------------------------------------------------------------------
# Teacher scores (offline)
# ---------------------------------------------------------------------------------------------------------------


def _shifted_log_probs(logits_fn: Callable[[jax.Array], jax.Array], tokens: jax.Array) -> jax.Array:
  """log p_T(. | x_<i) for i = 1..L-1 from one causal forward: float32 [B, L-1, V]."""
  logits = jnp.asarray(logits_fn(tokens)).astype(jnp.float32)
  return jax.nn.log_softmax(logits[:, :-1], axis=-1)


def teacher_token_nll(logits_fn: Callable[[jax.Array], jax.Array], tokens: jax.Array,
                      response_mask: jax.Array) -> jax.Array:
  """Teacher-forced NLL of every token: nll[b, i] = -log p_T(tokens[b, i] | tokens[b, :i]).

  One causal forward over `tokens`; the prediction for position i is read from the logits at i - 1.

  Args:
    logits_fn: causal teacher, tokens [B, L] int32 -> logits [B, L, V] (params closed over).
    tokens: [B, L] int32 (prompt ++ response).
    response_mask: [B, L] bool, slots to score. Position 0 has no context and always scores 0.

  Returns:
    float32 [B, L]: the NLL on response_mask slots, 0 elsewhere.
  """
  tok = jnp.asarray(tokens, jnp.int32)
  logp = _shifted_log_probs(logits_fn, tok)
  nll = -jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1)[..., 0]
  nll = jnp.concatenate([jnp.zeros_like(nll[:, :1]), nll], axis=1)
  return jnp.where(jnp.asarray(response_mask, bool), nll, 0.0)


def teacher_token_entropy(logits_fn: Callable[[jax.Array], jax.Array], tokens: jax.Array,
                          response_mask: jax.Array) -> jax.Array:
  """Teacher predictive entropy at every slot: H(p_T(. | tokens[b, :i])) (ablation score), float32 [B, L].

  Same conventions as `teacher_token_nll` (position 0 and non-response slots score 0).
  """
  logp = _shifted_log_probs(logits_fn, jnp.asarray(tokens, jnp.int32))
  ent = -jnp.sum(jnp.where(jnp.isfinite(logp), jnp.exp(logp) * logp, 0.0), axis=-1)
  ent = jnp.concatenate([jnp.zeros_like(ent[:, :1]), ent], axis=1)
  return jnp.where(jnp.asarray(response_mask, bool), ent, 0.0)


def teacher_response_scores(logits_fn: Callable[[jax.Array], jax.Array], prompt: jax.Array, response: jax.Array,
                            score: str = "nll") -> jax.Array:
  """Scores of the response slots of (prompt [B, P], response [B, R]) -> float32 [B, R] ("nll" or "entropy")."""
  prompt = jnp.asarray(prompt, jnp.int32)
  response = jnp.asarray(response, jnp.int32)
  if prompt.shape[1] < 1:
    raise ValueError("teacher scoring needs a prompt of at least one token (e.g. BOS)")
  tokens = jnp.concatenate([prompt, response], axis=1)
  rmask = jnp.concatenate([jnp.zeros(prompt.shape, bool), jnp.ones(response.shape, bool)], axis=1)
  if score == "nll":
    s = teacher_token_nll(logits_fn, tokens, rmask)
  elif score == "entropy":
    s = teacher_token_entropy(logits_fn, tokens, rmask)
  else:
    raise ValueError(f"score must be 'nll' or 'entropy', got {score!r}")
  return s[:, prompt.shape[1]:]


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def aup_weight(y: ArrayLike, y_max: float, alpha: float = 3.0) -> np.ndarray:
  """W(y) = min(exp(-alpha (1 - y / y_max)), 1) (float64)."""
  y = np.asarray(y, np.float64)
  return np.minimum(np.exp(-alpha * (1.0 - y / y_max)), 1.0)


def aup(tpf: ArrayLike, acc: ArrayLike, y_max: float, alpha: float = 3.0, y_min_offset: float = 5.0) -> float:
  """Accuracy under parallelism (d3LLM definition), accuracy in percent.

  Points are sorted by TPF (rho); y_1 = accuracy at the smallest rho; points with y < y_1 - y_min_offset are dropped
  (with a logged warning); then
    AUP = rho_1 y_1 + sum_{i>=2} (rho_i - rho_{i-1}) (y_i W(y_i) + y_{i-1} W(y_{i-1})) / 2.

  Args:
    tpf: [n] tokens per forward of one method's points.
    acc: [n] accuracies in percent.
    y_max: best accuracy of any method on the task.
    alpha: weight sharpness.
    y_min_offset: drop threshold below y_1.

  Returns:
    AUP as a float.
  """
  rho = np.asarray(tpf, np.float64).ravel()
  y = np.asarray(acc, np.float64).ravel()
  if rho.shape != y.shape or rho.size == 0:
    raise ValueError(f"aup needs equal, non-empty tpf and acc, got {rho.shape} and {y.shape}")
  if not y_max > 0:
    raise ValueError(f"y_max must be > 0, got {y_max}")
  order = np.argsort(rho, kind="stable")
  rho, y = rho[order], y[order]
  keep = y >= y[0] - y_min_offset
  if not keep.all():
    dropped = [(float(a), float(b)) for a, b in zip(rho[~keep], y[~keep])]
    logger.warning("aup: dropping %d point(s) more than %g below y_1 = %g: %s", len(dropped), y_min_offset, y[0],
                   dropped)
  rho, y = rho[keep], y[keep]
  wy = y * aup_weight(y, y_max, alpha)
  return float(rho[0] * y[0] + np.sum(np.diff(rho) * (wy[1:] + wy[:-1]) / 2.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks with ties given their average rank."""
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  start = np.cumsum(counts) - counts
  return (start + (counts + 1) / 2.0)[inverse.ravel()]


def spearman(x: ArrayLike, y: ArrayLike) -> float:
  """Spearman rank correlation with average ranks for ties; NaN when either side is constant or n < 2."""
  rx, ry = _average_ranks(np.asarray(x).ravel()), _average_ranks(np.asarray(y).ravel())
  if rx.size < 2:
    return float("nan")
  rx, ry = rx - rx.mean(), ry - ry.mean()
  den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
  return float((rx * ry).sum() / den) if den > 0 else float("nan")


def reveal_rank_correlation(commit_pass: ArrayLike, bucket: ArrayLike, valid: Optional[ArrayLike] = None) -> float:
  """Mean over responses of Spearman(commit pass, bucket) on valid slots.

  Positive = hard slots (bucket 1) committed first. Responses where either side is constant (e.g. all slots
  committed in one pass) or with fewer than two valid slots have no correlation and are left out.

  Args:
    commit_pass: [B, R] (or [R]) pass index at which each slot was committed.
    bucket: [B, R] bucket ids (1 = hardest).
    valid: [B, R] bool; None = bucket > 0.

  Returns:
    The average correlation, NaN if no response has one.
  """
  cp = np.atleast_2d(np.asarray(commit_pass))
  bk = np.atleast_2d(np.asarray(bucket))
  if cp.shape != bk.shape:
    raise ValueError(f"commit_pass {cp.shape} and bucket {bk.shape} differ in shape")
  v = bk > 0 if valid is None else np.atleast_2d(np.asarray(valid, bool))
  rhos = [spearman(cp[b][v[b]], bk[b][v[b]]) for b in range(cp.shape[0])]
  rhos = [r for r in rhos if not math.isnan(r)]
  return float(np.mean(rhos)) if rhos else float("nan")
