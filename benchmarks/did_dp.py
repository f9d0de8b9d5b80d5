"""Time and memory of the DID subsequence-counting DP (`log_insertion_weights`), batch 8.

Prints, for n in {128, 256, 512, 1024} and m in {n/4, n/2, n}: the median wall time of the jitted DP after a
warm-up, the compiled temp and output memory (XLA memory_analysis, where the backend reports it) and the time ratio to the
m = n/4 row of the same n, which should grow about linearly in m (the work is O(n m)). Prints figures only; it
never asserts timings.

  python benchmarks/did_dp.py [--reps 5] [--batch 8] [--sizes 128,256,512,1024] [--plain]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.methods.did import dp as did_dp


def bench(n: int, m: int, batch: int, reps: int, renormalize: bool) -> tuple[float, tuple[float, float] | None]:
  """Returns (median seconds, (temp bytes, output bytes) or None) for one (n, m) configuration."""
  rng = np.random.default_rng(n * 7919 + m)
  x0 = rng.integers(1, 1000, size=(batch, n)).astype(np.int32)
  keep = np.sort(np.stack([rng.choice(n, m, replace=False) for _ in range(batch)]), axis=1)
  xt = np.take_along_axis(x0, keep, axis=1)
  args = (jnp.asarray(x0), jnp.full((batch,), n, jnp.int32), jnp.asarray(xt), jnp.full((batch,), m, jnp.int32))
  compiled = jax.jit(lambda *a: did_dp.log_insertion_weights(*a, renormalize=renormalize)).lower(*args).compile()
  temp = None
  try:
    mem = compiled.memory_analysis()
    temp = None if mem is None else (float(mem.temp_size_in_bytes), float(mem.output_size_in_bytes))
  except (AttributeError, NotImplementedError):  # backend without memory analysis
    pass
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), temp


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--sizes", default="128,256,512,1024")
  parser.add_argument("--plain", action="store_true", help="global N instead of the per-slot renormalisation")
  args = parser.parse_args()
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} batch={args.batch} "
        f"reps={args.reps} renormalize={not args.plain}")
  print(f"{'n':>5} {'m':>5} {'median ms':>10} {'ns/(n*m)':>9} {'temp MB':>8} {'out MB':>7} {'t / t(m=n/4)':>13}")
  for n in (int(s) for s in args.sizes.split(",")):
    base = None
    for m in (n // 4, n // 2, n):
      sec, temp = bench(n, m, args.batch, args.reps, not args.plain)
      base = base or sec
      mem = f"{temp[0] / 2**20:8.1f} {temp[1] / 2**20:7.1f}" if temp is not None else f"{'n/a':>8} {'n/a':>7}"
      print(f"{n:5d} {m:5d} {sec * 1e3:10.2f} {sec * 1e9 / (n * m):9.1f} {mem} "
            f"{sec / base:9.2f} (m x{m / (n // 4):.0f})")


if __name__ == "__main__":
  main()
