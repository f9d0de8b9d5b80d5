r"""The import/export path at the published size (mdlm-owt: 12 blocks x 768, 12 heads, cond 128,
vocab 50258; 169.6M parameters), with random weights in the Hugging Face layout: import, sample
(a few steps), export, and whether the exported PyTorch layout is the input bit for bit. Prints
wall time and peak memory of each command (no assertion on them).

  python benchmarks/interop_owt.py [--tmp=/tmp/interop_owt]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dlm_jax.models import pytorch_dit  # noqa: E402  pylint: disable=wrong-import-position
from dlm_jax.run import interop  # noqa: E402  pylint: disable=wrong-import-position


def _cmd(args: list[str]) -> tuple[float, float]:
  """Runs `python -m ...`; returns (wall seconds, peak RSS of the child in GB)."""
  t0 = time.time()
  r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)
  if r.returncode:
    sys.exit(f"{args[0]} failed:\n{r.stderr[-3000:]}")
  return time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--tmp", default="/tmp/interop_owt")
  tmp = ap.parse_args().tmp
  shutil.rmtree(tmp, ignore_errors=True)
  hf, wd, out = (os.path.join(tmp, n) for n in ("hf", "wd", "out"))
  os.makedirs(hf)
  sizes = pytorch_dit.DitSizes(vocab_size=50258, d_model=768, num_layers=12, num_heads=12,
                               cond_dim=128, mlp_ratio=4)
  rng = np.random.default_rng(0)
  sd = {pytorch_dit.PREFIX + k: (rng.standard_normal(s, dtype=np.float32) * 0.02)
        for k, s in pytorch_dit.expected_shapes(sizes, with_inv_freq=False).items()}
  sd[pytorch_dit.PREFIX + pytorch_dit.INV_FREQ] = pytorch_dit.rope_inv_freq(64, 10000.0)
  interop._safetensors().save_file(sd, os.path.join(hf, "model.safetensors"),  # pylint: disable=protected-access
                                   metadata={"format": "pt"})
  with open(os.path.join(hf, "config.json"), "w", encoding="utf-8") as f:
    json.dump(dict(vocab_size=50258, model_length=1024, hidden_dim=768, cond_dim=128, n_blocks=12,
                   n_heads=12, dropout=0.1, time_conditioning=False), f)
  print(f"{sum(v.size for v in sd.values()):,} parameters, "
        f"{os.path.getsize(os.path.join(hf, 'model.safetensors')) / 2**20:.0f} MiB")
  for name, args in (
      ("import", ["dlm_jax.import_mdlm", f"--checkpoint={hf}", f"--workdir={wd}"]),
      ("sample (2 x 64 tokens, 4 steps)", ["dlm_jax.sample", f"--workdir={wd}", "--num_samples=2",
                                           "--set", "num_steps=4", "--set", "gen_len=64",
                                           "--set", "batch_size=2"]),
      ("export", ["dlm_jax.export", f"--workdir={wd}", f"--out={out}"])):
    sec, gb = _cmd(args)
    print(f"{name:34s} {sec:7.1f} s   peak RSS so far {gb:.1f} GB")
  back = interop.read_safetensors(os.path.join(out, "pytorch", "model.safetensors"))
  same = sorted(back) == sorted(sd) and all(back[k].tobytes() == v.tobytes() for k, v in sd.items())
  print(f"export after import, bit for bit: {same} ({len(sd)} tensors)")


if __name__ == "__main__":
  main()
