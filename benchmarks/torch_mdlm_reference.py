r"""Fallback PyTorch baseline for benchmarks/train_throughput.py: OUR eager re-implementation of the
published MDLM training step (not the published code).

When a checkout of the published code is at hand, `train_throughput.py --mdlm_repo=PATH` times that
instead (benchmarks/published_mdlm/driver.py); this script is what runs without one. It is written
for this benchmark to do the same work per step as the published DiT and loss, read from the paper
and the repository (kuleshov-group/mdlm):

- network: vocabulary embedding; a time embedding (sinusoidal features -> MLP -> SiLU) that feeds
  adaLN modulation (shift, scale, gate for attention and MLP) in every block and (shift, scale) in
  the final layer, computed even when time conditioning is off (then from sigma = 0, as published);
  weight-only LayerNorms; rotary Q/K; bias-free QKV and output projections; tanh-GELU MLP; dropout
  (default 0.1) on the attention and MLP branches before the gated residual add;
- loss: antithetic t, log-linear noise sigma(t) = -log(1 - (1 - eps) t), masking probability
  1 - exp(-sigma), SUBS (the mask logit pushed to -1e6, log-softmax, unmasked rows set to a point
  mass by two index writes), a NaN check over the logits, the gathered log-probability weighted by
  dsigma / expm1(sigma), averaged over all tokens;
- optimizer: AdamW (lr 3e-4, no weight decay), gradient-norm clipping at 1, an EMA of the
  parameters (0.9999), a constant-with-warm-up learning-rate schedule.
Idiomatic torch (scaled_dot_product_attention), float32, on random tokens.

  .venv-torch/bin/python benchmarks/torch_mdlm_reference.py --steps=10 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

NEG = -1e6  # the published code's stand-in for -inf


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
  """Rotary embedding on [B, H, L, D], halves convention."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Norm(nn.Module):
  """LayerNorm with a weight and no bias."""

  def __init__(self, d: int):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(d))

  def forward(self, x):
    return F.layer_norm(x, (x.shape[-1],), self.weight)


class TimeEmbedding(nn.Module):

  def __init__(self, cond: int, freq_dim: int = 256):
    super().__init__()
    self.freq_dim = freq_dim
    self.mlp = nn.Sequential(nn.Linear(freq_dim, cond), nn.SiLU(), nn.Linear(cond, cond))

  def forward(self, sigma):
    half = self.freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = sigma[:, None].float() * freqs[None]
    return F.silu(self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1)))


class Block(nn.Module):

  def __init__(self, d: int, heads: int, cond: int, dropout: float, mlp_ratio: int = 4):
    super().__init__()
    self.heads, self.p = heads, dropout
    self.norm1, self.norm2 = Norm(d), Norm(d)
    self.qkv = nn.Linear(d, 3 * d, bias=False)
    self.out = nn.Linear(d, d, bias=False)
    self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(approximate="tanh"),
                             nn.Linear(mlp_ratio * d, d))
    self.ada = nn.Linear(cond, 6 * d)
    nn.init.zeros_(self.ada.weight)
    nn.init.zeros_(self.ada.bias)

  def forward(self, x, cos, sin, c):
    b, l, d = x.shape
    shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
    y = self.norm1(x) * (1 + scale1) + shift1
    q, k, v = self.qkv(y).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v)
    o = self.out(o.transpose(1, 2).reshape(b, l, d))
    x = x + gate1 * F.dropout(o, self.p, self.training)
    y = self.mlp(self.norm2(x) * (1 + scale2) + shift2)
    return x + gate2 * F.dropout(y, self.p, self.training)


class DiT(nn.Module):

  def __init__(self, vocab: int, d: int, layers: int, heads: int, cond: int, dropout: float):
    super().__init__()
    self.embed = nn.Parameter(torch.empty(vocab, d))
    nn.init.kaiming_uniform_(self.embed, a=math.sqrt(5))
    self.time = TimeEmbedding(cond)
    self.blocks = nn.ModuleList([Block(d, heads, cond, dropout) for _ in range(layers)])
    self.norm = Norm(d)
    self.final_ada = nn.Linear(cond, 2 * d)
    self.head = nn.Linear(d, vocab)
    for m in (self.final_ada, self.head):
      nn.init.zeros_(m.weight)
      nn.init.zeros_(m.bias)
    hd = d // heads
    self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd))

  def forward(self, tokens, sigma):
    l = tokens.shape[1]
    ang = torch.arange(l, dtype=torch.float32)[:, None] * self.inv_freq[None]
    cos, sin = ang.cos(), ang.sin()
    x = self.embed[tokens]
    c = self.time(sigma)
    for blk in self.blocks:
      x = blk(x, cos, sin, c)
    shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)
    return self.head(self.norm(x) * (1 + scale) + shift)


def main():
  ap = argparse.ArgumentParser()
  for k, v in dict(num_layers=4, d_model=256, num_heads=4, seq_len=256, batch=8, vocab=50258,
                   cond_dim=128, steps=10, warmup_steps=2500).items():
    ap.add_argument(f"--{k}", type=int, default=v)
  ap.add_argument("--dropout", type=float, default=0.1)
  ap.add_argument("--ema", type=float, default=0.9999)
  ap.add_argument("--json", action="store_true")
  a = ap.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  mask_id, eps = a.vocab - 1, 1e-3
  model = DiT(a.vocab, a.d_model, a.num_layers, a.num_heads, a.cond_dim, a.dropout).train()
  params = list(model.parameters())
  opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=0.0)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup_steps))
  ema = [p.detach().clone() for p in params]
  gen = torch.Generator().manual_seed(0)
  batches = [torch.randint(0, mask_id, (a.batch, a.seq_len), generator=gen) for _ in range(4)]

  def step(x0):
    b, l = x0.shape
    u = (torch.rand(b) / b + torch.arange(b) / b) % 1.0          # antithetic times
    t = (1 - eps) * u + eps
    sigma = -torch.log1p(-(1 - eps) * t)
    dsigma = (1 - eps) / (1 - (1 - eps) * t)
    masked = torch.rand(b, l) < (1 - torch.exp(-sigma))[:, None]
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = model(xt, torch.zeros_like(sigma))                   # time conditioning off
    logits[:, :, mask_id] += NEG                                  # SUBS: never predict [MASK]
    logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    keep = xt != mask_id                                          # carry-over: point mass on xt
    logits[keep] = NEG
    logits[keep, xt[keep]] = 0.0
    if torch.isnan(logits).any():
      raise FloatingPointError("NaN in the logits")
    logp = torch.gather(logits, -1, x0[..., None])[..., 0]
    loss = (-logp * (dsigma / torch.expm1(sigma))[:, None]).sum() / (b * l)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
      for e, p in zip(ema, params):
        e.mul_(a.ema).add_(p, alpha=1 - a.ema)
    sched.step()
    return loss

  for i in range(2):
    step(batches[i % 4])
  times = []
  for i in range(a.steps):
    t0 = time.perf_counter()
    loss = step(batches[i % 4])
    loss.item()
    times.append(time.perf_counter() - t0)
  s = statistics.median(times)
  res = dict(framework="pytorch (our re-implementation of the published MDLM step)",
             version=torch.__version__, threads=torch.get_num_threads(), step_ms=s * 1e3,
             tokens_per_sec=a.batch * a.seq_len / s, final_loss=float(loss.detach()),
             params=sum(p.numel() for p in params), dropout=a.dropout)
  print(json.dumps(res) if a.json else res)


if __name__ == "__main__":
  main()
