"""Sampling at the cost of the network's trunk: what the fast decoders share.

A denoiser step has two parts of very different cost at a large vocabulary: the trunk (the
transformer up to its final norm, [B, L, d]) and the V-wide output head with its softmax and
categorical draw ([B, L, V], at V = 50k most of the work). A sampler rarely needs the head
everywhere: ancestral sampling reveals about L / T positions per sample and step, blockwise
decoding reads only the active block's masked slots, DID inserts in a few gaps. The fast
decoders therefore

* keep the trunk's hidden states [B, L, d] as their cache (not [B, L, V] logits);
* run the trunk only for the samples that need it (`refresh_rows`: the rows are gathered into
  the smallest power-of-two sub-batch that holds them, so a step where 2 of 8 samples change
  costs a 2-row pass);
* apply the head, its softmax and the draw only at the positions that use them
  (`for_selected_rows`: positions gathered up to a static budget; when more are selected the
  loop runs again on the next chunk, so the result is exact whatever the count).

`Denoiser` is the split interface (`Method.denoiser(params)` builds it from a model):
`features(tokens, valid) -> h [B, L, d]`, `head(h [..., d]) -> logits [..., V] float32`, with
`head(features(x)) == logits_fn(x)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """A masked-diffusion denoiser split at its final hidden state.

  Attributes:
    features: (tokens [B, L] int32, valid [B, L] bool or None) -> h [B, L, d]; `valid` False
      marks padding that no real position attends to (None: every slot is real).
    head: h [..., d] -> logits [..., V] float32 (the model's output layer, exactly).
  """
  features: Callable[[Array, Optional[Array]], Array]
  head: Callable[[Array], Array]

  def logits(self, tokens: Array, valid: Optional[Array] = None) -> Array:
    """The full [B, L, V] logits (what the reference decoders read)."""
    return self.head(self.features(tokens, valid))


def with_suppressed(denoiser: Denoiser, ids: Sequence[int]) -> Denoiser:
  """A denoiser whose head gives -inf to `ids` (never drawn), like the mask column."""
  if not ids:
    return denoiser
  ids_arr = jnp.asarray(tuple(int(i) for i in ids), jnp.int32)
  head = denoiser.head
  return dataclasses.replace(denoiser, head=lambda h: head(h).at[..., ids_arr].set(-jnp.inf))


def bucket_sizes(batch: int) -> tuple[int, ...]:
  """Sub-batch sizes the trunk is compiled for: powers of two below `batch`, then `batch`."""
  sizes = [1 << k for k in range(max(int(batch) - 1, 0).bit_length()) if (1 << k) < batch]
  return tuple(sizes) + (int(batch),)


def refresh_rows(fn: Callable[..., Any], inputs: Any, need: Array, cache: Any,
                 sizes: Optional[Sequence[int]] = None) -> Any:
  """Recomputes `cache` rows where `need`, running `fn` on those rows only.

  The needing rows are gathered (in row order) into the smallest sub-batch of `sizes` that
  holds them, `fn` runs on it, and its rows are scattered back; other rows keep their cache.
  No row needing it: no pass at all. One compiled `fn` per size (`lax.switch`).

  Args:
    fn: inputs with leading dimension k -> outputs with leading dimension k (a pytree).
    inputs: pytree of [B, ...] arrays.
    need: [B] bool.
    cache: pytree of [B, ...] arrays shaped like fn's outputs.
    sizes: sub-batch sizes (default `bucket_sizes(B)`); the last must be B.

  Returns:
    The updated cache.
  """
  b = need.shape[0]
  sizes = tuple(sizes or bucket_sizes(b))
  if sizes[-1] != b:
    raise ValueError(f"the largest sub-batch size must be the batch {b}; got {sizes}")
  count = jnp.sum(need.astype(jnp.int32))
  rows = jnp.nonzero(need, size=b, fill_value=b)[0].astype(jnp.int32)  # needing rows first

  def run(k):
    def branch(c):
      if k == b:  # whole batch: no gather; rows that do not need it keep their cache
        fresh = fn(inputs)
        return jax.tree.map(lambda f, o: jnp.where(
            need.reshape((b,) + (1,) * (o.ndim - 1)), f.astype(o.dtype), o), fresh, c)
      idx = rows[:k]
      sub = jax.tree.map(lambda x: jnp.take(x, jnp.minimum(idx, b - 1), axis=0), inputs)
      fresh = fn(sub)  # rows past `count` are filler (index b): the scatter drops them
      return jax.tree.map(lambda o, f: o.at[idx].set(f.astype(o.dtype), mode="drop"), c, fresh)
    return branch

  which = jnp.where(count == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes), count, side="left"))
  branches = [lambda c: c] + [run(k) for k in sizes]
  return jax.lax.switch(which, branches, cache)


def chunk_sizes(budget: int, smallest: int = 8) -> tuple[int, ...]:
  """Chunk sizes `for_selected_rows` picks from: budget / 2^k down to `smallest`, ascending."""
  sizes = [int(budget)]
  while sizes[-1] // 2 >= smallest and sizes[-1] % 2 == 0:
    sizes.append(sizes[-1] // 2)
  return tuple(sorted(sizes))


def for_selected_rows(selected: Array, budget: int,
                      body: Callable[[Array, Array, Array, Any], Any], carry: Any,
                      sizes: Optional[Sequence[int]] = None) -> Any:
  """Runs `body` on the selected flat positions, at most `budget` at a time, until all are done.

  Each pass takes the smallest chunk size of `sizes` (default `chunk_sizes(budget)`) that holds
  the positions still to do (or the largest), so a step with few positions pays for few rows.

  Args:
    selected: [N] bool.
    budget: static largest chunk (positions per pass of `body`).
    body: (chunk index c, idx [k] int32 positions (N = filler), valid [k] bool, carry) ->
      carry, for each k in `sizes`. Filler entries have valid False and idx N (gather with a
      clamp, scatter with mode="drop").
    carry: loop state.
    sizes: the chunk sizes (ascending, the last one the budget).

  Returns:
    The final carry. With at most `budget` positions selected `body` runs once; with none, never.
  """
  n = selected.shape[0]
  k_max = int(min(max(int(budget), 1), n))
  sizes = tuple(min(int(k), k_max) for k in (sizes or chunk_sizes(k_max)))
  sizes = tuple(sorted(set(sizes) | {k_max}))
  count = jnp.sum(selected.astype(jnp.int32))
  order = jnp.nonzero(selected, size=n + k_max, fill_value=n)[0].astype(jnp.int32)

  def chunk(k):
    def run(c, done, carry):
      idx = jax.lax.dynamic_slice(order, (done,), (k,))
      valid = done + jnp.arange(k, dtype=jnp.int32) < count
      return body(c, jnp.where(valid, idx, n), valid, carry)
    return run

  branches = [chunk(k) for k in sizes]
  size_arr = jnp.asarray(sizes, jnp.int32)

  def step(state):
    c, done, carry = state
    which = jnp.minimum(jnp.searchsorted(size_arr, count - done, side="left"), len(sizes) - 1)
    carry = branches[0](c, done, carry) if len(sizes) == 1 else jax.lax.switch(
        which, branches, c, done, carry)
    return c + 1, done + size_arr[which], carry

  _, _, carry = jax.lax.while_loop(lambda s: s[1] < count, step,
                                   (jnp.int32(0), jnp.int32(0), carry))
  return carry


def reveal_budget(num_slots: int, max_prob: float, sds: float = 2.0, multiple: int = 8) -> int:
  """A static chunk size for `for_selected_rows` when each of `num_slots` positions is selected
  independently with probability at most `max_prob`: the mean plus `sds` standard deviations
  plus one, rounded up to `multiple` (an overflowing step runs one more chunk; exact either way).
  """
  p = min(max(float(max_prob), 0.0), 1.0)
  mean = num_slots * p
  k = mean + sds * math.sqrt(num_slots * p * (1.0 - p)) + 1.0
  k = int(-(-k // multiple) * multiple)
  return int(max(multiple, min(k, max(num_slots, 1))))


def flat_take(x: Array, idx: Array) -> Array:
  """Rows of x [B, L, ...] at flat positions idx [K] (b * L + l; clamped)."""
  b, length = x.shape[:2]
  flat = x.reshape((b * length,) + x.shape[2:])
  return jnp.take(flat, jnp.minimum(idx, b * length - 1), axis=0)


def flat_set(x: Array, idx: Array, values: Array) -> Array:
  """x [B, L] with flat positions idx [K] set to values (idx >= B L dropped)."""
  shape = x.shape
  return x.reshape(-1).at[idx].set(values.astype(x.dtype), mode="drop").reshape(shape)
