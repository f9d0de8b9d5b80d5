r"""What optim.grad_accum_steps buys: the compiled train step's temporary memory for k = 1, 2, 4, 8.

XLA's own accounting of the compiled step (`memory_analysis()`), so nothing runs and the figures
do not depend on machine load; it prints the temporaries (activations, gradients, the
accumulator) and the ratio to k = 1 at the same global batch.

  python benchmarks/grad_accum_memory.py [--batch=32] [--seq_len=256] [--d_model=256] \
      [--layers=4] [--method=mdlm]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import ml_collections  # noqa: E402

from configs import mdlm_tiny  # noqa: E402
from dlm_jax import parallel  # noqa: E402
from dlm_jax.run import experiment as exp_lib  # noqa: E402
from dlm_jax.run import trainer  # noqa: E402


def step_memory(args, k: int) -> dict:
  c = mdlm_tiny.get_config()
  c.method = args.method
  if args.method == "did":
    c.model.time_conditioning = True
  c.data.tokenizer = "bytes"
  c.data.seq_len = args.seq_len
  c.model.max_len = args.seq_len + 1
  c.model.d_model = args.d_model
  c.model.num_layers = args.layers
  c.model.num_heads = max(args.d_model // 64, 1)
  c.train.global_batch_size = args.batch
  c.optim.grad_accum_steps = k
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                            jax.devices()[:1])
  exp = exp_lib.Experiment.create(c, mesh=mesh)
  state = exp.abstract_state()
  row = jax.ShapeDtypeStruct((args.batch, args.seq_len), jax.numpy.int32,
                             sharding=parallel.batch_sharding(mesh))
  batch = dict(tokens=row, segment_ids=row, positions=row)
  step = jax.jit(trainer.make_train_step(exp), donate_argnums=(0,))
  with parallel.sharding_context(mesh):
    compiled = step.lower(state, batch, jax.random.key(0)).compile()
  mem = compiled.memory_analysis()
  return dict(k=k, temp=mem.temp_size_in_bytes, args=mem.argument_size_in_bytes)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--method", default="mdlm", choices=["mdlm", "did", "ar"])
  p.add_argument("--ks", default="1,2,4,8")
  args = p.parse_args()
  rows = [step_memory(args, int(k)) for k in args.ks.split(",")]
  base = rows[0]["temp"]
  print(f"{args.method}: global batch {args.batch} x {args.seq_len}, {args.layers} x {args.d_model}"
        f" (jaxlib {jax.__version__}, {jax.devices()[0].platform})")
  print("| grad_accum_steps | micro-batch | step temporaries (MiB) | vs k = 1 |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['k']} | {args.batch // r['k']} | {r['temp'] / 2**20:.1f} | {r['temp'] / base:.2f}x |")


if __name__ == "__main__":
  main()
