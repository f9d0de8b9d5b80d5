"""Attention backends side by side: XLA, our Pallas flash kernels, and JAX's own kernels.

  python benchmarks/attention.py                      # B=4, H=12, D=64, bf16, L=256..8192
  python benchmarks/attention.py --causal --head_dim=128 --lengths=1024,4096
  python benchmarks/attention.py --segments=padded    # one document per row (what cuDNN takes)

Backends (`dlm_jax.models.attention`): 'xla' (the reference), 'pallas' (ours), and the platform's
vendor kernel: 'splash' on TPU (JAX's splash attention), 'cudnn' on GPU (cuDNN's fused attention;
it takes no segment ids, so it runs with --segments=padded only). All run in one process on the same
inputs. Times are medians of --iters calls after warm-up; memory is XLA's compiled temp allocation
(`memory_analysis().temp_size_in_bytes`), i.e. the scratch beyond inputs and outputs. TFLOP/s
counts model FLOPs (forward 4*B*H*L^2*D, backward 2.5x that; halved when causal). On CPU only a
correctness check runs (Pallas and splash in interpret mode against XLA): timings need a GPU or
TPU. Ratios are printed, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.kernels import flash_attention as fa
from dlm_jax.models import attention as attention_lib
from dlm_jax.models.attention import xla_attention


def _segments(b: int, l: int, seed: int = 0, kind: str = "packed") -> jax.Array:
  """[B, L] int32: three documents per row ('packed') or one ('padded'), then ~3% padding."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((b, l), np.int32)
  end = l - max(1, l // 32)
  for i in range(b):
    if kind == "padded":
      seg[i, :end] = 1
      continue
    cuts = np.sort(rng.choice(np.arange(1, end), 2, replace=False))
    seg[i, :cuts[0]], seg[i, cuts[0]:cuts[1]], seg[i, cuts[1]:end] = 1, 2, 3
  return jnp.asarray(seg)


def _inputs(b, l, h, d, dtype, seed=0, kind="packed"):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, k, v, ct = [jax.random.normal(kk, (b, l, h, d), jnp.float32).astype(dtype) for kk in ks]
  return q, k, v, ct, _segments(b, l, seed, kind)


def _fns(attend, seg, causal):
  """(forward, forward+backward) jitted functions of (q, k, v, ct)."""
  def fwd(q, k, v, ct):
    del ct
    return attend(q, k, v, seg, seg, causal=causal)

  def fwd_bwd(q, k, v, ct):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg, seg, causal=causal), q, k, v)
    return (out, *vjp(ct))
  return jax.jit(fwd), jax.jit(fwd_bwd)


def _measure(fn, args, iters: int):
  """(median ms, temp MiB) or (None, message) when it fails (e.g. out of memory)."""
  try:
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = mem.temp_size_in_bytes / 2**20 if mem is not None else float("nan")
    jax.block_until_ready(compiled(*args))
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), temp
  except Exception as e:  # pylint: disable=broad-except
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return None, ("OOM" if "RESOURCE_EXHAUSTED" in msg or "memory" in msg.lower() else msg[:60])


def _rel(x, ref) -> float:
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _fmt(x, spec=".2f"):
  return "-" if x is None else format(x, spec)


def cpu_check() -> None:
  """Small interpret-mode correctness check (what this script can do without an accelerator)."""
  q, k, v, ct, seg = _inputs(1, 160, 2, 64, jnp.float32)
  ref = _fns(xla_attention, seg, False)[1](q, k, v, ct)
  print("backend: cpu (no GPU/TPU): interpret-mode correctness checks only; timings need an "
        "accelerator.")
  kernels = {
      "pallas (Triton-style)": fa.make_attention_fn(block_q=64, block_k=32, backend="gpu",
                                                    interpret=True),
      "splash (TPU, interpreted)": attention_lib.make_splash_attention(interpret=True),
  }
  ok = True
  for name, attend in kernels.items():
    got = _fns(attend, seg, False)[1](q, k, v, ct)
    errs = [_rel(x, r) for x, r in zip(got, ref)]
    ok = ok and max(errs) < 1e-5
    print(f"{name}: relative error vs XLA (out, dq, dk, dv): " + ", ".join(f"{e:.1e}" for e in errs))
  print("OK" if ok else "MISMATCH")


def _backends(platform: str, segments: str, block_q, block_k) -> dict:
  out = {"xla": xla_attention,
         "pallas": fa.make_attention_fn(block_q=block_q, block_k=block_k)}
  if platform == "tpu":
    out["splash"] = attention_lib.make_splash_attention()
  elif platform == "gpu" and segments == "padded":
    out["cudnn"] = attention_lib.make_cudnn_attention()
  elif platform == "gpu":
    print("cudnn: skipped (it takes no segment ids; run with --segments=padded)")
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--segments", default="packed", choices=("packed", "padded"))
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--block_q", type=int, default=None)
  parser.add_argument("--block_k", type=int, default=None)
  parser.add_argument("--skip_xla_above", type=int, default=1 << 30,
                      help="skip the XLA path for longer sequences")
  args = parser.parse_args()

  platform = jax.default_backend()
  if platform not in ("gpu", "tpu"):
    cpu_check()
    return

  dtype = jnp.dtype(args.dtype)
  b, h, d = args.batch, args.heads, args.head_dim
  backends = _backends(platform, args.segments, args.block_q, args.block_k)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({platform}), jax {jax.__version__}")
  print(f"B={b} H={h} D={d} dtype={dtype.name} causal={args.causal} segments={args.segments} "
        f"block_q={args.block_q} block_k={args.block_k} (None = kernel default); "
        f"median of {args.iters}")
  cols = ["L", "backend", "fwd ms", "fwd x", "f+b ms", "f+b x", "f+b TFLOP/s", "fwd temp MiB",
          "f+b temp MiB", "max rel err vs xla"]
  print(" | ".join(cols))
  print(" | ".join("-" * len(c) for c in cols))
  for l in [int(x) for x in args.lengths.split(",")]:
    q, k, v, ct, seg = _inputs(b, l, h, d, dtype, kind=args.segments)
    flops = 3.5 * 4 * b * h * l * l * d * (0.5 if args.causal else 1.0)
    rows, ref = {}, None
    for name, attend in backends.items():
      if name == "xla" and l > args.skip_xla_above:
        rows[name] = (None, "skipped", None, "skipped", None)
        continue
      fwd, fb = _fns(attend, seg, args.causal)
      tf, fmem = _measure(fwd, (q, k, v, ct), args.iters)
      tb, bmem = _measure(fb, (q, k, v, ct), args.iters)
      err = None
      if tb is not None:
        got = fb(q, k, v, ct)
        if name == "xla":
          ref = got
        elif ref is not None:
          err = max(_rel(a, r) for a, r in zip(got, ref))
      rows[name] = (tf, fmem, tb, bmem, err)
    xf, _, xb, _, _ = rows.get("xla", (None,) * 5)
    ratio = lambda x, p: None if x is None or p is None else x / p  # noqa: E731
    for name, (tf, fmem, tb, bmem, err) in rows.items():
      cells = [str(l), name, _fmt(tf), _fmt(ratio(xf, tf)), _fmt(tb), _fmt(ratio(xb, tb)),
               _fmt(None if tb is None else flops / tb / 1e9, ".1f"),
               *[_fmt(m, ".1f") if isinstance(m, float) else str(m) for m in (fmem, bmem)],
               _fmt(err, ".1e")]
      print(" | ".join(cells), flush=True)
  print("x = XLA time / backend time (>1: faster than XLA). temp = compiled scratch memory.")


if __name__ == "__main__":
  main()
