"""Generation quality under an exact evaluator (the HMM-16 toys): NLL per token by the forward algorithm,
per-sample unigram entropy, and the length law of variable-length samples.

Samples are lists of symbol ids (BOS dropped; a masked model's padded sample cut at its first PAD, see
`first_pad_lengths`). A sample with an id outside the evaluator's symbols, or an empty one, cannot be scored:
it is counted (`unscorable`) and left out of the NLL averages, never silently given a finite score.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from dlm_jax.data.tasks.hmm import HMM16, HMM16VarLen
from dlm_jax.evaluation.gen_ppl import unigram_entropy


def first_pad_lengths(tokens: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Lengths of padded samples [B, L] = index of the first `pad_id` (L if none), and whether a non-PAD id
  follows the first PAD (a 'hole': the masked model wrote symbols after the end it also wrote)."""
  x = np.atleast_2d(np.asarray(tokens))
  is_pad = x == pad_id
  lengths = np.where(is_pad.any(1), np.argmax(is_pad, 1), x.shape[1]).astype(np.int64)
  after = np.arange(x.shape[1])[None, :] >= lengths[:, None]
  holes = (after & ~is_pad).any(1)
  return lengths, holes


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
  """0.5 * sum |p - q| of two probability vectors on the same support."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  if p.shape != q.shape:
    raise ValueError(f"total_variation: shapes differ, {p.shape} vs {q.shape}")
  return 0.5 * float(np.abs(p - q).sum())


def length_tv_from_uniform(lengths: Sequence[int], lo: int, hi: int) -> float:
  """Total-variation distance between the empirical law of `lengths` and U{lo..hi}.

  Lengths outside lo..hi keep their full empirical mass in the distance (the uniform law has none there).
  """
  lengths = np.asarray(lengths, np.int64).ravel()
  if lengths.size == 0:
    raise ValueError("length_tv_from_uniform: no lengths")
  if hi < lo:
    raise ValueError(f"length_tv_from_uniform: empty support {lo}..{hi}")
  top = max(int(lengths.max()), hi) + 1
  emp = np.bincount(np.clip(lengths, 0, None), minlength=top) / lengths.size
  uni = np.zeros(top)
  uni[lo:hi + 1] = 1.0 / (hi - lo + 1)
  return total_variation(emp, uni)


def expected_tv_of_uniform_sample(n: int, lo: int, hi: int, draws: int = 2000, seed: int = 0) -> float:
  """Mean TV distance of an n-sample histogram drawn from U{lo..hi} itself: the floor a perfect sampler sees."""
  rng = np.random.default_rng(seed)
  return float(np.mean([length_tv_from_uniform(rng.integers(lo, hi + 1, n), lo, hi) for _ in range(draws)]))


def generation_report(samples: Sequence[Sequence[int]], evaluator: HMM16,
                      varlen: HMM16VarLen | None = None) -> dict[str, Any]:
  """Scores generated symbol sequences with an exact HMM evaluator (use the smoothed one: finite everywhere).

  Args:
    samples: B sequences of symbol ids (any lengths).
    evaluator: the HMM whose forward algorithm scores each sample over its own length.
    varlen: when given, also the length law: TV from U{min_len..max_len}, the share of lengths outside it,
      and the NLL with the length term log(1 / #lengths) (finite only on the support).

  Returns:
    dict: nll_per_token (sum of NLL / sum of lengths over scorable samples), nll_per_token_mean (mean of
    per-sample NLL / length), unigram_entropy (mean over samples), mean_len, sd_len, len_hist (counts of
    0..max), unscorable (count), num_samples, and with `varlen`: length_tv, outside_support,
    nll_with_length_per_token (over samples of a supported length).
  """
  seqs = [np.asarray(s, np.int64).ravel() for s in samples]
  lens = np.asarray([s.size for s in seqs], np.int64)
  ok = np.asarray([s.size > 0 and s.min() >= 0 and s.max() < evaluator.VOCAB_SIZE for s in seqs], bool)
  width = max(int(lens.max()) if lens.size else 1, 1)
  x = np.zeros((len(seqs), width), np.int64)
  for i, s in enumerate(seqs):
    if ok[i]:
      x[i, :s.size] = s
  nll = np.full(len(seqs), np.nan)
  if ok.any():
    nll[ok] = -evaluator.log_prob(x[ok], lens[ok])
  out = dict(num_samples=len(seqs), unscorable=int((~ok).sum()),
             nll_per_token=float(nll[ok].sum() / max(lens[ok].sum(), 1)) if ok.any() else float("nan"),
             nll_per_token_mean=float(np.mean(nll[ok] / lens[ok])) if ok.any() else float("nan"),
             unigram_entropy=float(np.mean([unigram_entropy(s) for s in seqs])) if seqs else float("nan"),
             mean_len=float(lens.mean()) if lens.size else float("nan"),
             sd_len=float(lens.std(ddof=1)) if lens.size > 1 else 0.0,
             len_hist=np.bincount(lens, minlength=width + 1).tolist())
  if varlen is not None:
    support = (lens >= varlen.min_len) & (lens <= varlen.max_len)
    out["length_tv"] = length_tv_from_uniform(lens, varlen.min_len, varlen.max_len)
    out["outside_support"] = float(1.0 - support.mean())
    both = ok & support
    out["nll_with_length_per_token"] = (
        float((nll[both].sum() + both.sum() * math.log(varlen.num_lengths)) / lens[both].sum())
        if both.any() else float("nan"))
  return out
