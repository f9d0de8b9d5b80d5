"""Generative perplexity: samples judged by an autoregressive model trained by this repository.

Samples are detokenized and re-tokenized with the judge's tokenizer (so judge and generator
may differ), then scored with [BOS] + text; gen-PPL = exp(total NLL / total judged tokens).
Always report it with the sample unigram entropy (low-entropy collapse scores well).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax import parallel


def unigram_entropy(ids: Sequence[int]) -> float:
  """Entropy (nats) of the token histogram of one sample."""
  ids = np.asarray(list(ids))
  if ids.size == 0:
    return 0.0
  _, counts = np.unique(ids, return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())


def judge_nll(judge: Any, texts: Sequence[str], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Per-text summed NLL (nats) and token counts under a loaded AR run (`dlm_jax.load`).

  Texts longer than the judge's context are truncated to it (the count says how many tokens
  were scored).
  """
  if getattr(judge.method, "family", "") != "causal":
    raise ValueError(f"The gen-PPL judge must be an autoregressive run (a method of the 'causal' "
                     f"family, e.g. 'ar'), got method={judge.config.method!r}.")
  tok = judge.tokenizer
  length = judge.config.data.seq_len
  rows = []
  for t in texts:
    ids = [tok.bos_id] + list(tok.encode(t))[:length - 1]
    rows.append(ids)
  method = judge.method
  fn = jax.jit(lambda p, b: method.per_token_nll(p, b))
  nll_out, cnt_out = [], []
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    n = len(chunk)
    tokens = np.full((batch_size, length), tok.pad_id, np.int32)
    seg = np.zeros_like(tokens)
    for j, ids in enumerate(chunk):
      tokens[j, :len(ids)] = ids
      seg[j, :len(ids)] = 1
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    batch = dict(tokens=jnp.asarray(tokens), segment_ids=jnp.asarray(seg),
                 positions=jnp.asarray(pos))
    with parallel.sharding_context(judge.mesh):
      nll, w = jax.device_get(fn(judge.params, batch))
    nll_out.append(np.asarray(nll).sum(-1)[:n])
    cnt_out.append(np.asarray(w).sum(-1)[:n])
  return np.concatenate(nll_out), np.concatenate(cnt_out)


def gen_ppl(judge: Any, texts: Sequence[str], token_ids: Sequence[Sequence[int]] | None = None
            ) -> dict[str, float]:
  """gen-PPL of `texts` under `judge`, with mean unigram entropy and mean length."""
  nll, cnt = judge_nll(judge, texts)
  total = float(cnt.sum())
  ents = [unigram_entropy(ids) for ids in (token_ids if token_ids is not None else
                                            [judge.tokenizer.encode(t) for t in texts])]
  return dict(gen_ppl=math.exp(float(nll.sum()) / max(total, 1.0)),
              gen_nll_per_token=float(nll.sum()) / max(total, 1.0),
              unigram_entropy=float(np.mean(ents)) if ents else 0.0,
              judged_tokens=total, num_samples=len(texts))
