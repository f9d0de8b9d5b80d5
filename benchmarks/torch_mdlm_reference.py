r"""PyTorch baseline for benchmarks/train_throughput.py: the same MDLM train step in eager PyTorch.

Same architecture as dlm_jax.models.transformer without time conditioning (pre-LN blocks, RoPE,
fused QKV without bias, tanh-GELU MLP, separate output head), the same loss (log-linear
schedule, stratified t, masked cross-entropy weighted 1/t, token normalisation), AdamW with
global-norm clipping and an EMA of the parameters, on random tokens. It stands in for the
research PyTorch MDLM code (a DiT trained the same way), which cannot be fetched here; it is
written for this benchmark, idiomatically (torch.nn.functional.scaled_dot_product_attention).

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


def rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
  """x [B, H, L, D] -> rotated by position (first half / second half convention)."""
  d, length = x.shape[-1], x.shape[-2]
  freqs = theta ** (-torch.arange(0, d // 2, dtype=torch.float32) * 2.0 / d)
  ang = torch.arange(length, dtype=torch.float32)[:, None] * freqs[None]
  sin, cos = ang.sin(), ang.cos()
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):

  def __init__(self, d: int, heads: int, mlp_ratio: int = 4):
    super().__init__()
    self.heads = heads
    self.ln1 = nn.LayerNorm(d, bias=False)
    self.qkv = nn.Linear(d, 3 * d, bias=False)
    self.out = nn.Linear(d, d, bias=False)
    self.ln2 = nn.LayerNorm(d, bias=False)
    self.fc1 = nn.Linear(d, mlp_ratio * d)
    self.fc2 = nn.Linear(mlp_ratio * d, d)

  def forward(self, x):
    b, l, d = x.shape
    q, k, v = self.qkv(self.ln1(x)).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(rope(q), rope(k), v)
    x = x + self.out(o.transpose(1, 2).reshape(b, l, d))
    return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class Denoiser(nn.Module):

  def __init__(self, vocab: int, d: int, layers: int, heads: int):
    super().__init__()
    self.embed = nn.Embedding(vocab, d)
    self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
    self.ln = nn.LayerNorm(d, bias=False)
    self.head = nn.Linear(d, vocab)

  def forward(self, tokens):
    x = self.embed(tokens)
    for blk in self.blocks:
      x = blk(x)
    return self.head(self.ln(x))


def main():
  ap = argparse.ArgumentParser()
  for k, v in dict(num_layers=4, d_model=256, num_heads=4, seq_len=256, batch=8, vocab=50258,
                   steps=10).items():
    ap.add_argument(f"--{k}", type=int, default=v)
  ap.add_argument("--json", action="store_true")
  a = ap.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  mask_id = a.vocab - 1
  model = Denoiser(a.vocab, a.d_model, a.num_layers, a.num_heads)
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.0), dict(params=no_decay,
                                                                       weight_decay=0.0)], lr=1e-3)
  ema = [p.detach().clone() for p in model.parameters()]
  gen = torch.Generator().manual_seed(0)
  batches = [torch.randint(3, a.vocab - 1, (a.batch, a.seq_len), generator=gen) for _ in range(4)]

  def step(x0):
    b, l = x0.shape
    u = (torch.arange(b) + torch.rand(b)) / b
    t = 1e-3 + (1 - 1e-3) * u
    masked = torch.rand(b, l) < t[:, None]
    masked[:, 0] = False
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = model(xt).float()
    logits[..., mask_id] = -float("inf")
    ce = F.cross_entropy(logits.view(-1, a.vocab), x0.view(-1), reduction="none").view(b, l)
    loss = ((ce * masked).sum(-1) / t).sum() / (b * (l - 1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      for e, p in zip(ema, model.parameters()):
        e.mul_(0.999).add_(p, alpha=0.001)
    return loss

  for i in range(3):
    step(batches[i % 4])
  times, window = [], 5
  for _ in range(max(a.steps // window, 1)):
    t0 = time.perf_counter()
    for i in range(window):
      loss = step(batches[i % 4])
    loss.item()
    times.append((time.perf_counter() - t0) / window)
  s = statistics.median(times)
  res = dict(framework="pytorch", version=torch.__version__, threads=torch.get_num_threads(),
             step_ms=s * 1e3, tokens_per_sec=a.batch * a.seq_len / s, final_loss=float(loss),
             params=sum(p.numel() for p in model.parameters()))
  print(json.dumps(res) if a.json else res)


if __name__ == "__main__":
  main()
