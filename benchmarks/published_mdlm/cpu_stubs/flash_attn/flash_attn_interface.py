"""CPU stand-in for `flash_attn.flash_attn_interface` (exact softmax attention in torch).

Same call conventions as flash-attn 2.x:
  q, k, v: [batch, seqlen, nheads, headdim]; qkv packed: [batch, seqlen, 3, nheads, headdim];
  varlen: tokens of all sequences concatenated along dim 0, sequence i being
  rows cu_seqlens[i]:cu_seqlens[i+1] (cu_seqlens int32 [batch + 1]).
Semantics kept: softmax_scale defaults to 1/sqrt(headdim); causal masks are
aligned to the bottom-right corner when seqlen_q != seqlen_k (flash-attn >= 2.1);
window_size=(left, right) restricts query i to keys
[i + sk - sq - left, i + sk - sq + right] (-1 = unbounded); dropout_p drops
attention probabilities (pass 0.0 at evaluation, as flash-attn requires);
fewer K/V heads than Q heads (MQA/GQA) are shared by consecutive query heads.
Unlike flash-attn, float32 inputs are accepted (flash-attn wants fp16/bf16).
Not implemented (raise): alibi_slopes, softcap, return_attn_probs, KV cache APIs.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
]


def _check_unsupported(alibi_slopes, softcap, return_attn_probs):
    if alibi_slopes is not None:
        raise NotImplementedError("cpu flash_attn stub: alibi_slopes is not implemented")
    if softcap:
        raise NotImplementedError("cpu flash_attn stub: softcap is not implemented")
    if return_attn_probs:
        raise NotImplementedError("cpu flash_attn stub: return_attn_probs is not implemented")


def _attention(q, k, v, dropout_p, softmax_scale, causal, window_size):
    """q: [b, sq, hq, d], k/v: [b, sk, hk, d] -> [b, sq, hq, d]."""
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    if hq % hk:
        raise ValueError(f"number of query heads {hq} is not a multiple of key/value heads {hk}")
    if hk != hq:
        k = k.repeat_interleave(hq // hk, dim=2)
        v = v.repeat_interleave(hq // hk, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    left, right = window_size
    if causal:
        right = 0
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if left < 0 and right < 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p, scale=scale)
    elif left < 0 and right == 0 and sq == sk:
        out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p, is_causal=True,
                                             scale=scale)
    else:
        i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        j = torch.arange(sk, device=q.device)[None, :]
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
        # A query row with no allowed key gives 0 output in flash-attn (not NaN).
        empty = ~allowed.any(-1)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed | empty[:, None],
                                             dropout_p=dropout_p, scale=scale)
        out = out.masked_fill(empty[None, None, :, None], 0.0)
    return out.transpose(1, 2)


def _segments(cu_seqlens: torch.Tensor) -> Sequence[int]:
    return [int(x) for x in cu_seqlens.tolist()]


def _varlen(q, k, v, cu_q, cu_k, dropout_p, softmax_scale, causal, window_size):
    """q: [total_q, hq, d], k/v: [total_k, hk, d]; returns [total_q, hq, d]."""
    bq, bk = _segments(cu_q), _segments(cu_k)
    if len(bq) != len(bk):
        raise ValueError("cu_seqlens_q and cu_seqlens_k give different batch sizes")
    n = len(bq) - 1
    lq = {bq[i + 1] - bq[i] for i in range(n)}
    lk = {bk[i + 1] - bk[i] for i in range(n)}
    if (len(lq) == 1 and len(lk) == 1 and bq[0] == 0 and bk[0] == 0
            and bq[-1] == q.shape[0] and bk[-1] == k.shape[0]):
        sq, sk = lq.pop(), lk.pop()
        out = _attention(q.reshape(n, sq, *q.shape[1:]), k.reshape(n, sk, *k.shape[1:]),
                         v.reshape(n, sk, *v.shape[1:]), dropout_p, softmax_scale, causal,
                         window_size)
        return out.reshape(q.shape[0], *out.shape[2:])
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    pieces = []
    for i in range(n):
        qi = q[bq[i]:bq[i + 1]][None]
        ki = k[bk[i]:bk[i + 1]][None]
        vi = v[bk[i]:bk[i + 1]][None]
        pieces.append((bq[i], bq[i + 1],
                       _attention(qi, ki, vi, dropout_p, softmax_scale, causal, window_size)[0]))
    if not pieces:
        return out
    # Rows outside every segment stay 0, as flash-attn leaves them untouched.
    idx = torch.cat([torch.arange(a, b_, device=q.device) for a, b_, _ in pieces])
    vals = torch.cat([o for _, _, o in pieces])
    return out.index_copy(0, idx, vals)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    deterministic=False, return_attn_probs=False):
    """q: [b, sq, hq, d], k/v: [b, sk, hk, d] -> [b, sq, hq, d]."""
    _check_unsupported(alibi_slopes, softcap, return_attn_probs)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, tuple(window_size))


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """qkv: [b, s, 3, h, d] -> [b, s, h, d]."""
    _check_unsupported(alibi_slopes, softcap, return_attn_probs)
    return _attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale,
                      causal, tuple(window_size))


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """q: [b, sq, hq, d], kv: [b, sk, 2, hk, d] -> [b, sq, hq, d]."""
    _check_unsupported(alibi_slopes, softcap, return_attn_probs)
    return _attention(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal,
                      tuple(window_size))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False,
                           window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q: [total_q, hq, d], k/v: [total_k, hk, d] -> [total_q, hq, d]."""
    _check_unsupported(alibi_slopes, softcap, return_attn_probs)
    if block_table is not None:
        raise NotImplementedError("cpu flash_attn stub: block_table (paged KV) is not implemented")
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, softmax_scale, causal,
                   tuple(window_size))


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv: [total, 3, h, d], cu_seqlens: int32 [batch + 1] -> [total, h, d]."""
    _check_unsupported(alibi_slopes, softcap, return_attn_probs)
    return _varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, dropout_p,
                   softmax_scale, causal, tuple(window_size))


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                                    causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False):
    """q: [total_q, hq, d], kv: [total_k, 2, hk, d] -> [total_q, hq, d]."""
    _check_unsupported(alibi_slopes, softcap, return_attn_probs)
    return _varlen(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, dropout_p, softmax_scale,
                   causal, tuple(window_size))
