"""DID costs as ratios from one run: the DP, a train step vs MDLM, sampling vs MDLM. Prints figures only.

1. DP (`log_insertion_weights`, batch 8): median time and compiled memory as n and m grow; the time ratio to the
   m = n/4 row of the same n should grow about linearly in m (O(n m) work). Reuses benchmarks/did_dp.py.
2. Train step (forward + backward + AdamW, jitted, the real `trainer.make_train_step`) for the same model and
   batch of B rows of L tokens:
   - fixed-length setting: full rows (every row is L document tokens); MDLM vs DID-fixed (DICE + seqnorm,
     packed: 2 rows' survivors per model row) and DID-fixed unpacked;
   - variable-length setting: one document per row, lengths U{L/8..L}, padded to L (as a RADD/MDLM baseline
     would be); MDLM vs DID-variable (DISE + count head + time input, packed).
   Issue targets: DID <= 1.15x MDLM per step at fixed length and < 1x at variable length.
3. Sampling time per sample, DID vs MDLM (ancestral), the same number of steps (untrained weights: the cost of
   a step does not depend on them, DID's lengths do).

  python benchmarks/did.py [--seq_len 128] [--batch 32] [--d_model 128] [--layers 4] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import did_tiny, mdlm_tiny  # noqa: E402
from dlm_jax.run import experiment as exp_lib  # noqa: E402
from dlm_jax import parallel  # noqa: E402
from dlm_jax.run import trainer  # noqa: E402
import did_dp  # noqa: E402  # pylint: disable=g-import-not-at-top


def _median_time(fn, reps: int) -> float:
  jax.block_until_ready(fn())  # compile + warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _config(method: str, args, **kw):
  c = (did_tiny if method == "did" else mdlm_tiny).get_config()
  c.data.tokenizer = "bytes"  # no BPE training; V = 260 is small, so the trunk dominates as at scale
  c.data.seq_len = args.seq_len
  c.model.max_len = args.seq_len + 1
  c.model.d_model, c.model.num_layers, c.model.num_heads = args.d_model, args.layers, args.heads
  c.train.global_batch_size = args.batch
  c.optim.ema_decay = 0.0
  for k, v in kw.items():
    node = c
    *path, last = k.split("__")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _mesh():
  import ml_collections  # pylint: disable=g-import-not-at-top
  return parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])


def make_batch(b: int, length: int, variable: bool, seed: int = 0) -> dict[str, np.ndarray]:
  """Rows [BOS] + random bytes: full rows, or one document of U{L/8..L} tokens per row padded to L."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, 260, size=(b, length)).astype(np.int32)
  tokens[:, 0] = 1  # BOS of the bytes tokenizer
  lens = rng.integers(length // 8, length + 1, size=b) if variable else np.full(b, length)
  seg = (np.arange(length)[None, :] < lens[:, None]).astype(np.int32)
  tokens = np.where(seg > 0, tokens, 0)
  pos = np.where(seg > 0, np.arange(length)[None, :], 0).astype(np.int32)
  return dict(tokens=tokens, segment_ids=seg, positions=pos,
              example_id=np.arange(b, dtype=np.int32))


def step_time(cfg, batch: dict[str, np.ndarray], reps: int) -> tuple[float, float]:
  """(median seconds per train step, network tokens per step)."""
  exp = exp_lib.Experiment.create(cfg, mesh=_mesh())
  step = jax.jit(trainer.make_train_step(exp))
  state = exp.init_state(0)
  gb = {k: jnp.asarray(v) for k, v in batch.items()}
  key = jax.random.key(0)
  sec = _median_time(lambda: step(state, gb, key)[1]["loss"], reps)
  _, met = step(state, gb, key)
  tokens = float(met.get("model_tokens", cfg.train.global_batch_size * cfg.data.seq_len))
  return sec, tokens


def sample_time(cfg, steps: int, batch: int, reps: int) -> tuple[float, float, float]:
  """(median seconds per sample, mean NFE per sample, mean generated length)."""
  exp = exp_lib.Experiment.create(cfg, mesh=_mesh())
  params = exp.init_state(0).params
  s = cfg.sample
  s.batch_size, s.num_steps = batch, steps
  s.decoder = "did" if cfg.method == "did" else "ancestral"
  key = jax.random.key(1)
  sec = _median_time(lambda: exp.method.sample(params, key, s)["tokens"], reps)
  out = jax.device_get(exp.method.sample(params, key, s))
  length = float(np.mean(out["lengths"])) if "lengths" in out else float(out["gen_len"])
  return sec / batch, float(np.mean(out["nfe"])), length


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--dp_sizes", default="128,256,512")
  p.add_argument("--sample_steps", default="32,128")
  p.add_argument("--skip", default="", help="comma list of sections to skip: dp,train,sample")
  args = p.parse_args()
  skip = set(filter(None, args.skip.split(",")))
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} L={args.seq_len} "
        f"B={args.batch} d={args.d_model} layers={args.layers} reps={args.reps}", flush=True)

  if "dp" not in skip:
    print("\n== 1. DP log_insertion_weights, batch 8 ==")
    print(f"{'n':>5} {'m':>5} {'median ms':>10} {'ns/(n*m)':>9} {'temp MB':>8} {'t/t(m=n/4)':>11} {'m ratio':>8}")
    for n in (int(s) for s in args.dp_sizes.split(",")):
      base = None
      for m in (n // 4, n // 2, n):
        sec, mem = did_dp.bench(n, m, 8, args.reps, True)
        base = base or sec
        mb = f"{mem[0] / 2**20:8.1f}" if mem else f"{'n/a':>8}"
        print(f"{n:5d} {m:5d} {sec * 1e3:10.2f} {sec * 1e9 / (n * m):9.1f} {mb} {sec / base:11.2f} "
              f"{m / (n // 4):8.0f}", flush=True)

  if "train" not in skip:
    print("\n== 2. train step (jit, fwd + bwd + AdamW), same model and batch ==")
    L, B = args.seq_len, args.batch
    settings = [
        ("fixed", False, [("mdlm", _config("mdlm", args)),
                          ("did-fixed packed", _config("did", args, did__variant="fixed",
                                                       model__time_conditioning=False)),
                          ("did-fixed unpacked", _config("did", args, did__variant="fixed",
                                                         model__time_conditioning=False,
                                                         did__pack=False))]),
        ("variable", True, [("mdlm (padded)", _config("mdlm", args)),
                            ("did-variable packed", _config("did", args)),
                            ("did-variable unpacked", _config("did", args, did__pack=False))]),
    ]
    for name, variable, arms in settings:
      batch = make_batch(B, L, variable)
      doc_tokens = int(batch["segment_ids"].sum())
      print(f"-- {name}-length setting: {B} rows x {L}, {doc_tokens} document tokens --")
      base = None
      for label, cfg in arms:
        sec, tok = step_time(cfg, batch, args.reps)
        base = base or sec
        print(f"  {label:24s} {sec * 1e3:9.1f} ms/step  {tok:7.0f} network tokens/step  "
              f"time x{sec / base:.2f} vs mdlm  tokens x{tok / (B * L):.2f}", flush=True)

  if "sample" not in skip:
    print("\n== 3. sampling time per sample (untrained weights), batch 16 ==")
    for steps in (int(s) for s in args.sample_steps.split(",")):
      res = {}
      for label, cfg in (("mdlm", _config("mdlm", args)), ("did-variable", _config("did", args)),
                         ("did-fixed", _config("did", args, did__variant="fixed",
                                               model__time_conditioning=False))):
        res[label] = sample_time(cfg, steps, 16, max(args.reps // 2, 1))
      for label, (sec, nfe, length) in res.items():
        print(f"  T={steps:4d} {label:13s} {sec * 1e3:8.1f} ms/sample  NFE {nfe:6.1f}  length {length:6.1f}  "
              f"time x{sec / res['mdlm'][0]:.2f} vs mdlm", flush=True)


if __name__ == "__main__":
  main()
