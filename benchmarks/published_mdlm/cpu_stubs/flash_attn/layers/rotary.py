"""CPU stand-in for `flash_attn.layers.rotary` (rotary position embedding in torch).

Same conventions as flash-attn 2.x:
  cos, sin: [seqlen_rotary, rotary_dim / 2]; only the first rotary_dim channels
  of each head are rotated, the rest pass through.
  Non-interleaved (GPT-NeoX): channel c pairs with c + rotary_dim/2.
  Interleaved (GPT-J): channel 2c pairs with 2c + 1.
  seqlen_offsets: int or int tensor [batch]; position p of sequence b uses row
  p + offset[b] of cos/sin.
The rotation is computed in float32 and stored back in the input dtype, as
flash-attn's kernel does. Gradients flow through ordinary torch autograd
(the rotation is linear, so they equal flash-attn's conjugate rotation).
"""
from typing import Optional, Union

import torch

__all__ = ["apply_rotary_emb", "apply_rotary_emb_func", "apply_rotary_emb_qkv_",
           "apply_rotary_emb_kv_"]


def _cos_sin_rows(cos, sin, seqlen, batch, offsets):
    """cos/sin rows for positions [0, seqlen) (+ offsets), shaped to broadcast over [b, s, h, d/2]."""
    if isinstance(offsets, int):
        if cos.shape[0] < seqlen + offsets:
            raise ValueError(f"cos/sin have {cos.shape[0]} rows, need {seqlen + offsets}")
        return cos[offsets:offsets + seqlen][None, :, None], sin[offsets:offsets + seqlen][None, :, None]
    offsets = offsets.to(torch.long).reshape(batch, 1)
    pos = torch.arange(seqlen, device=cos.device)[None, :] + offsets  # [b, s]
    if int(pos.max()) >= cos.shape[0]:
        raise ValueError(f"cos/sin have {cos.shape[0]} rows, need {int(pos.max()) + 1}")
    return cos[pos][:, :, None], sin[pos][:, :, None]


def _rotated(x, cos, sin, interleaved, conjugate, offsets):
    """x: [b, s, h, d] -> rotated copy of x[..., :rotary_dim] (float32 maths, x's dtype)."""
    half = cos.shape[-1]
    rd = 2 * half
    if rd > x.shape[-1]:
        raise ValueError(f"rotary_dim {rd} exceeds head dim {x.shape[-1]}")
    c, s = _cos_sin_rows(cos, sin, x.shape[1], x.shape[0], offsets)
    c, s = c.float(), s.float()
    if conjugate:
        s = -s
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
    o1 = x1 * c - x2 * s
    o2 = x1 * s + x2 * c
    if interleaved:
        out = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:
        out = torch.cat((o1, o2), dim=-1)
    return out.to(x.dtype)


def _apply(x, cos, sin, interleaved, inplace, offsets, conjugate=False):
    rd = 2 * cos.shape[-1]
    rot = _rotated(x, cos, sin, interleaved, conjugate, offsets)
    if inplace:
        x[..., :rd].copy_(rot)
        return x
    return torch.cat((rot, x[..., rd:]), dim=-1)


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False,
                     seqlen_offsets: Union[int, torch.Tensor] = 0,
                     cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None):
    """x: [b, s, h, d] (or [total, h, d] with cu_seqlens) -> same shape, first rotary_dim rotated."""
    if cu_seqlens is None:
        return _apply(x, cos, sin, interleaved, inplace, seqlen_offsets)
    bounds = [int(v) for v in cu_seqlens.tolist()]
    offs = (seqlen_offsets if isinstance(seqlen_offsets, int)
            else [int(v) for v in seqlen_offsets.tolist()])
    pieces = []
    for i in range(len(bounds) - 1):
        seg = x[bounds[i]:bounds[i + 1]][None]
        off = offs if isinstance(offs, int) else offs[i]
        pieces.append(_apply(seg, cos, sin, interleaved, inplace, off)[0])
    if inplace:
        return x
    return torch.cat(pieces + [x[bounds[-1]:]], dim=0) if bounds[0] == 0 else torch.cat(
        [x[:bounds[0]]] + pieces + [x[bounds[-1]:]], dim=0)


apply_rotary_emb_func = apply_rotary_emb


def apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False,
                          seqlen_offsets: Union[int, torch.Tensor] = 0,
                          num_heads_q: Optional[int] = None):
    """Rotate Q and K of a packed qkv IN PLACE; returns qkv.

    qkv: [b, s, 3, h, d], or [b, s, hq + 2 * hk, d] with num_heads_q = hq (MQA/GQA).
    cos_k/sin_k (optional) are used for K instead of cos/sin.
    """
    cos_k = cos if cos_k is None else cos_k
    sin_k = sin if sin_k is None else sin_k
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            raise ValueError(f"expected qkv [b, s, 3, h, d], got {tuple(qkv.shape)}")
        q, k = qkv[:, :, 0], qkv[:, :, 1]
    else:
        if num_heads_q is None:
            raise ValueError("num_heads_q is required for qkv of shape [b, s, hq + 2 hk, d]")
        hk = (qkv.shape[2] - num_heads_q) // 2
        if qkv.shape[2] != num_heads_q + 2 * hk:
            raise ValueError("qkv head count is not num_heads_q + 2 * num_heads_k")
        q, k = qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q:num_heads_q + hk]
    # Compute both rotations from the original values before writing either.
    rq = _rotated(q, cos, sin, interleaved, False, seqlen_offsets)
    rk = _rotated(k, cos_k, sin_k, interleaved, False, seqlen_offsets)
    rd_q, rd_k = 2 * cos.shape[-1], 2 * cos_k.shape[-1]
    q[..., :rd_q].copy_(rq)
    k[..., :rd_k].copy_(rk)
    return qkv


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False,
                         seqlen_offsets: Union[int, torch.Tensor] = 0):
    """Rotate K of a packed kv [b, s, 2, h, d] IN PLACE; returns kv."""
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"expected kv [b, s, 2, h, d], got {tuple(kv.shape)}")
    _apply(kv[:, :, 0], cos, sin, interleaved, True, seqlen_offsets)
    return kv
