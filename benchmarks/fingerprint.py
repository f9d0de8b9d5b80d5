r"""Behaviour fingerprint of every tiny config, through the command-line entry points only.

For each config it trains a few steps (`python -m dlm_jax.train`), reads the per-step losses from
metrics.jsonl, hashes the parameters of the saved checkpoint (read with Orbax directly, so the
package's own restore code is not what is being checked) and draws seeded samples
(`python -m dlm_jax.sample`). The ARITH-CHAIN SFT arms go through the whole TRIMS chain: pretrain,
teacher, `python -m dlm_jax.score_difficulty`, fine-tune.

Run it before and after a change that must not change behaviour (a refactor), then compare:

  python benchmarks/fingerprint.py --out=/tmp/before.json   # on the old commit
  python benchmarks/fingerprint.py --out=/tmp/after.json    # on the new one
  python benchmarks/fingerprint.py --compare=/tmp/before.json,/tmp/after.json

Only the entry points, flags and config fields that a refactor keeps are used.

A change that keeps a reference path and makes a new default (issue 19: the fast decoders draw
from the same distribution, not the same numbers) is compared on the reference path:

  python benchmarks/fingerprint.py --out=/tmp/after.json --sample_flag=--set=reference=true
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

STEPS = 4
COMMON = [f"--config.train.num_steps={STEPS}", "--config.train.log_every=1",
          f"--config.train.ckpt_every={STEPS}", "--config.train.eval_every=1000"]

# (name, config file, extra train flags, sample flags); "{sft}" and "{pre}" are filled in.
RUNS = [
    ("mdlm_tiny", "configs/mdlm_tiny.py", [], ["--set=num_steps=8"]),
    ("mdlm_tiny_threshold", "configs/mdlm_tiny.py", [],
     ["--set=decoder=threshold", "--set=block_len=32", "--set=r2=conf,token,stability"]),
    ("mdlm_tiny_light", "configs/mdlm_tiny_light.py", [], ["--set=num_steps=8"]),
    ("did_tiny", "configs/did_tiny.py", [], ["--set=num_steps=8"]),
    ("ar_tiny", "configs/ar_tiny.py", [], ["--set=gen_len=16"]),
    ("hmm_heavy", "configs/hmm_heavy.py", [], ["--set=num_steps=8", "--set=batch_size=4"]),
    ("hmm_light", "configs/hmm_light.py", [], ["--set=num_steps=8", "--set=batch_size=4"]),
    ("arith_pretrain", "configs/arith_pretrain.py", [], ["--set=batch_size=4"]),
    ("arith_teacher", "configs/arith_teacher.py", [], None),
    ("arith_sft_standard", "configs/arith_sft_standard.py",
     ["--config.data.path={sft}", "--config.train.init_from={pre}"], ["--set=batch_size=4"]),
    ("arith_sft_standard_uniform", "configs/arith_sft_standard_uniform.py",
     ["--config.data.path={sft}", "--config.train.init_from={pre}"], None),
    ("arith_sft_trims", "configs/arith_sft_trims.py",
     ["--config.data.path={sft}", "--config.train.init_from={pre}"], None),
    ("arith_sft_trims_easy", "configs/arith_sft_trims_easy.py",
     ["--config.data.path={sft}", "--config.train.init_from={pre}"], None),
    ("arith_sft_trims_rand", "configs/arith_sft_trims_rand.py",
     ["--config.data.path={sft}", "--config.train.init_from={pre}"], None),
]


def _run(args: list[str]) -> None:
  proc = subprocess.run([sys.executable] + args, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _params_hash(ckpt_dir: str) -> dict[str, str]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(ckpt_dir, "state"))
  out = {}
  for part in ("params", "ema_params"):
    if tree.get(part) is None:
      continue
    h = hashlib.sha256()
    flat = []

    def walk(node, prefix=""):
      if isinstance(node, dict):
        for k in sorted(node):
          walk(node[k], f"{prefix}/{k}")
      else:
        flat.append((prefix, np.asarray(node)))

    walk(tree[part])
    for name, arr in flat:
      h.update(name.encode())
      h.update(arr.tobytes())
    out[part] = h.hexdigest()[:16]
  return out


def fingerprint(root: str, sample_flags: tuple[str, ...] = ()) -> dict:
  res = {}
  sft = os.path.join(root, "sft.npz")
  pre = os.path.join(root, "arith_pretrain")
  for name, config, extra, sample in RUNS:
    wd = os.path.join(root, name)
    if name.startswith("arith_sft") and not os.path.exists(sft):
      _run(["-m", "dlm_jax.score_difficulty", f"--teacher_workdir={os.path.join(root, 'arith_teacher')}",
            "--data=arith:seed=11,n=64", "--student_config=configs/arith_pretrain.py",
            f"--out={sft}"])
    flags = [f.format(sft=sft, pre=pre) for f in extra]
    _run(["-m", "dlm_jax.train", f"--config={config}", f"--workdir={wd}"] + COMMON + flags)
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    entry = dict(losses=losses, params=_params_hash(os.path.join(wd, "checkpoints", str(STEPS))))
    if sample is not None:
      out = os.path.join(wd, "fp_samples")
      _run(["-m", "dlm_jax.sample", f"--workdir={wd}", "--num_samples=2", "--seed=3",
            f"--out_dir={out}"] + sample + list(sample_flags))
      recs = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
      entry["samples"] = [r["tokens"] for r in recs]
      entry["nfe"] = [r["nfe"] for r in recs]
    res[name] = entry
    print(f"{name}: losses {['%.6f' % x for x in losses]} params {entry['params']}", flush=True)
  return res


def compare(a_path: str, b_path: str) -> int:
  a, b = json.load(open(a_path)), json.load(open(b_path))
  bad = 0
  for name in sorted(set(a) | set(b)):
    if name not in a or name not in b:
      print(f"{name}: only in one file")
      bad += 1
      continue
    diffs = []
    la, lb = a[name]["losses"], b[name]["losses"]
    if la != lb:
      worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la, lb)) if len(la) == len(lb) else 1.0
      diffs.append(f"losses differ (max relative {worst:.2e})")
    if a[name]["params"] != b[name]["params"]:
      diffs.append("parameters differ")
    if a[name].get("samples") != b[name].get("samples"):
      diffs.append("samples differ")
    if a[name].get("nfe") != b[name].get("nfe"):
      diffs.append("NFE differs")
    print(f"{name}: {'identical' if not diffs else '; '.join(diffs)}")
    bad += bool(diffs)
  return bad


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="fingerprint.json")
  ap.add_argument("--root", default="", help="work folder (default: a temporary one, removed after)")
  ap.add_argument("--compare", default="", help="a.json,b.json: print what differs; exit 1 if anything")
  ap.add_argument("--sample_flag", action="append", default=[],
                  help="extra flag for every `dlm_jax.sample` call (repeatable), e.g. "
                       "--sample_flag=--set=reference=true")
  args = ap.parse_args()
  if args.compare:
    sys.exit(1 if compare(*args.compare.split(",")) else 0)
  root = args.root or tempfile.mkdtemp(prefix="dlm_fingerprint_")
  try:
    res = fingerprint(root, tuple(args.sample_flag))
  finally:
    if not args.root:
      shutil.rmtree(root, ignore_errors=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
