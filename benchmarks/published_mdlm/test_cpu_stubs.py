"""Checks of the CPU stand-ins in cpu_stubs/ against float64 references (no flash-attn needed).

  .venv-torch/bin/python -m pytest -q benchmarks/published_mdlm/test_cpu_stubs.py
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_stubs"))

import flash_attn  # noqa: E402
import flash_attn.layers.rotary as rotary  # noqa: E402
from flash_attn.flash_attn_interface import flash_attn_func  # noqa: E402
from flash_attn.flash_attn_interface import flash_attn_varlen_qkvpacked_func  # noqa: E402


def ref_attn(q, k, v, causal=False, window=(-1, -1)):
  """Softmax attention in float64 with bottom-right aligned causal/window masks; [b, s, h, d]."""
  scale = 1 / math.sqrt(q.shape[-1])
  s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
  sq, sk = q.shape[1], k.shape[1]
  i = torch.arange(sq)[:, None] + sk - sq
  j = torch.arange(sk)[None]
  m = torch.ones(sq, sk, dtype=torch.bool)
  left, right = window
  if causal:
    right = 0
  if left >= 0:
    m &= j >= i - left
  if right >= 0:
    m &= j <= i + right
  p = torch.softmax(s.masked_fill(~m, float("-inf")), -1).nan_to_num(0.0)
  return torch.einsum("bhqk,bkhd->bqhd", p, v.double()).float()


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equal_lengths(causal):
  torch.manual_seed(0)
  b, s, h, d = 3, 17, 4, 16
  qkv = torch.randn(b * s, 3, h, d)
  cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
  out = flash_attn_varlen_qkvpacked_func(qkv, cu, s, 0.0, causal=causal)
  q, k, v = (qkv.view(b, s, 3, h, d)[:, :, i] for i in range(3))
  torch.testing.assert_close(out, ref_attn(q, k, v, causal).reshape(b * s, h, d), atol=2e-6, rtol=1e-5)


def test_varlen_unequal_lengths_attend_within_segment():
  torch.manual_seed(1)
  qkv = torch.randn(51, 3, 4, 16)
  cu = torch.tensor([0, 5, 20, 51], dtype=torch.int32)
  out = flash_attn_varlen_qkvpacked_func(qkv, cu, 31, 0.0)
  for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
    seg = qkv[a:e][None]
    torch.testing.assert_close(out[a:e], ref_attn(seg[:, :, 0], seg[:, :, 1], seg[:, :, 2])[0],
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (2, 1)), (True, (3, -1))])
def test_bottom_right_causal_and_window(causal, window):
  torch.manual_seed(2)
  q, k, v = torch.randn(2, 7, 4, 8), torch.randn(2, 11, 4, 8), torch.randn(2, 11, 4, 8)
  torch.testing.assert_close(flash_attn_func(q, k, v, causal=causal, window_size=window),
                             ref_attn(q, k, v, causal, window), atol=2e-6, rtol=1e-5)


HALF, D = 4, 16
ANG = torch.rand(20, HALF, generator=torch.Generator().manual_seed(3)) * 6
COS, SIN = ANG.cos(), ANG.sin()


def ref_rot(x, off=0, interleaved=False):
  """Rotation of the first 2*HALF channels as complex multiplication, in float64."""
  xr = x[..., :2 * HALF].double()
  z = (torch.complex(xr[..., 0::2], xr[..., 1::2]) if interleaved
       else torch.complex(xr[..., :HALF], xr[..., HALF:]))
  a = ANG[off:off + x.shape[1]].double()
  z = z * torch.polar(torch.ones_like(a), a)[None, :, None]
  o = torch.stack([z.real, z.imag], -1).flatten(-2) if interleaved else torch.cat([z.real, z.imag], -1)
  return torch.cat([o.float(), x[..., 2 * HALF:]], -1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offset", [0, 3])
def test_rotary_qkv_inplace(interleaved, offset):
  x = torch.randn(2, 9, 3, 3, D)
  y = x.clone()
  ret = rotary.apply_rotary_emb_qkv_(y, COS, SIN, interleaved=interleaved, seqlen_offsets=offset)
  assert ret is y
  for i in (0, 1):
    torch.testing.assert_close(y[:, :, i], ref_rot(x[:, :, i], offset, interleaved), atol=1e-6, rtol=1e-5)
  assert torch.equal(y[:, :, 2], x[:, :, 2])


def test_rotary_tensor_offsets():
  x = torch.randn(2, 9, 3, 3, D)
  y = x.clone()
  rotary.apply_rotary_emb_qkv_(y, COS, SIN, seqlen_offsets=torch.tensor([0, 3]))
  torch.testing.assert_close(y[1:, :, 0], ref_rot(x[1:, :, 0], 3), atol=1e-6, rtol=1e-5)
  torch.testing.assert_close(y[:1, :, 1], ref_rot(x[:1, :, 1], 0), atol=1e-6, rtol=1e-5)


def test_rotary_gradient_through_inplace_update():
  torch.manual_seed(4)
  w = torch.randn(8, 3 * 3 * D, requires_grad=True)
  inp = torch.randn(2, 9, 8)

  def f(inplace):
    qkv = (inp @ w).view(2, 9, 3, 3, D)   # a view of a non-leaf, as in models/dit.py
    if inplace:
      qkv = rotary.apply_rotary_emb_qkv_(qkv, COS, SIN)
    else:
      qkv = torch.stack([ref_rot(qkv[:, :, 0]), ref_rot(qkv[:, :, 1]), qkv[:, :, 2]], 2)
    return (qkv.sin() * torch.arange(qkv.numel()).view_as(qkv)).sum()

  g1, = torch.autograd.grad(f(True), w)
  g2, = torch.autograd.grad(f(False), w)
  torch.testing.assert_close(g1, g2, atol=1e-2, rtol=1e-5)


def test_other_stubs_import_and_refuse():
  import causal_conv1d
  import datasets
  import mamba_ssm.ops.selective_scan_interface as ssi
  import timm.scheduler
  assert causal_conv1d.causal_conv1d_fn is None
  assert not hasattr(datasets, "load_dataset")
  with pytest.raises(NotImplementedError):
    ssi.selective_scan_fn()
  with pytest.raises(NotImplementedError):
    timm.scheduler.CosineLRScheduler()
  with pytest.raises(NotImplementedError):
    flash_attn.flash_attn_func(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8),
                               torch.zeros(1, 1, 1, 8), softcap=1.0)
