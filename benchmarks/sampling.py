r"""Sampling cost: the fast decoders against the reference ones (and the published PyTorch MDLM).

Seconds per batch, network calls per sample and peak memory for ancestral sampling, threshold
decoding (tau 0.9, block 32) and DID at T = 128 and T = 1000 (the MDLM paper's default), batch 8,
at the comparison shape (4 blocks x 256 x 4 heads, length 256, V 50,258, float32 network,
untrained weights: the cost of a step does not depend on them; float64 draws). "reference" is
the original loop (`sample.reference=True`: full [B, L, V] logits and a categorical over V at
every position every step), "fast" the default (the head and the draw only where a token is
drawn, the trunk's hidden states as the cache).

Every measurement runs in a fresh process (compilation excluded from the time; peak memory is
the process's resident set while sampling, VmHWM reset after compilation, plus XLA's own temp
allocation), and the variants alternate in rounds, so a ratio compares runs taken close
together; the tables print the median over rounds.

  python benchmarks/sampling.py                                  # everything, 1 round
  python benchmarks/sampling.py --rounds=3 --steps=128 --decoders=ancestral \
      --mdlm_repo=/path/to/kuleshov-group/mdlm --torch_python=/path/to/torch-venv/bin/python
  python benchmarks/sampling.py --profile --paths=fast           # where the fast path's time goes
  python benchmarks/sampling.py --steps=128 --ref_steps=16 --profile --profile_decoders=ancestral \
      --mdlm_repo=/path/to/mdlm --torch_python=/path/to/torch-venv/bin/python --out=t128.json
                                                      # the README's T = 128 table (one round)
  python benchmarks/sampling.py --shape=tiny                     # a quick smoke run

The reference loops and the published code take minutes per batch here; --ref_steps=K times
only their first K steps of the T-step grid (their cost per step is about constant: the
V-wide work runs every step) and extrapolates, labelled "extrapolated". --mdlm_repo runs
`benchmarks/published_mdlm/driver.py` (our driver; the published code is imported
from the given checkout, never copied) in a torch venv, with float64 draws like ours
(--mdlm_draw=as_published for its float32 draws), and prints the checkout's commit.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SHAPES = {
    "comparison": dict(layers=4, d=256, heads=4, length=256, batch=8, vocab=50258),
    "tiny": dict(layers=2, d=64, heads=2, length=64, batch=8, vocab=512),
}
DECODERS = ("ancestral", "threshold", "did")


# -- worker: one measurement in this process ---------------------------------------------------
def _rss_reset() -> None:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM (peak resident set) to the current RSS
  except OSError:
    pass


def _status_mib(field: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def build(decoder: str, shape: dict):
  """(method, params) of an untrained MDLM or DID model at `shape`."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from configs import did_owt, mdlm_owt  # pylint: disable=g-import-not-at-top
  from dlm_jax import methods  # pylint: disable=g-import-not-at-top
  from dlm_jax.methods.base import SpecialIds  # pylint: disable=g-import-not-at-top
  did = decoder == "did"
  c = did_owt.get_config() if did else mdlm_owt.get_config()
  c.data.seq_len = shape["length"] - (1 if did else 0)
  c.model.max_len = shape["length"]
  c.model.num_layers, c.model.d_model, c.model.num_heads = shape["layers"], shape["d"], shape["heads"]
  c.model.dropout, c.model.dtype, c.model.attention = 0.0, "float32", "xla"
  c.model.tie_embeddings = False
  v = shape["vocab"]
  ids = SpecialIds(bos=v - 2, eos=v - 2, mask=v - 1, pad=v - 2, vocab_size=v)
  method = methods.get_method_class("did" if did else "mdlm")(c, ids)
  params = flax.linen.meta.unbox(method.init_params(jax.random.key(0)))
  return method, params


def make_fn(decoder: str, path: str, steps: int, shape: dict, method, ref_steps: int,
            counting=None):
  """A jittable fn(params, key) -> dict(tokens, nfe) and a note on what it runs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dlm_jax.methods.did import sampler as did_sampler  # pylint: disable=g-import-not-at-top
  from dlm_jax.sampling import ancestral, blockwise  # pylint: disable=g-import-not-at-top
  from dlm_jax.sampling.common import prefix_layout  # pylint: disable=g-import-not-at-top
  b, length = shape["batch"], shape["length"]
  mask = method.ids.mask
  run_steps = steps if path == "fast" or not ref_steps else min(ref_steps, steps)
  note = "full" if run_steps == steps else f"first {run_steps} of {steps} steps, extrapolated"
  wrap = counting or (lambda x: x)
  if decoder == "ancestral":
    x0 = jnp.full((b, length), mask, jnp.int32)
    m = jnp.ones((b, length), bool)
    # The first K steps of the T grid = K steps ending at t_final = 1 - K / T.
    t_final = 1.0 - run_steps / steps
    if path == "fast":
      def fn(p, key):
        tok, nfe = ancestral.fast_ancestral_sample(wrap(method.denoiser(p)), key, x0, m, mask,
                                                   run_steps, schedule=method.schedule,
                                                   t_final=t_final)
        return dict(tokens=tok, nfe=nfe)
    else:
      def fn(p, key):
        tok, nfe = ancestral.ancestral_sample(method.logits_fn(p), key, x0, m, mask, run_steps,
                                              schedule=method.schedule, t_final=t_final)
        return dict(tokens=tok, nfe=nfe)
    return fn, note, run_steps / steps
  if decoder == "threshold":
    prompt = jnp.zeros((b, 0), jnp.int32)
    if path == "fast":
      layout = jax.tree.map(jnp.asarray, prefix_layout(np.zeros((b, 0), np.int32), length, mask, 32))

      def fn(p, key):
        del key
        res = blockwise.fast_decode_threshold(wrap(method.denoiser(p)), layout, 32, 0.9,
                                              mask_id=mask)
        return dict(tokens=res.tokens, nfe=res.nfe)
      return fn, "full", 1.0
    passes = ref_steps or None

    def fn(p, key):
      del key
      res = blockwise.decode_threshold(method.logits_fn(p), prompt, length, 32, 0.9,
                                       mask_id=mask, max_passes=passes)
      return dict(tokens=res.tokens, nfe=res.nfe)
    return fn, ("full" if passes is None else f"first {passes} passes, extrapolated"), 1.0
  cap = length - 1
  if path == "fast":
    layout = jax.tree.map(jnp.asarray, did_sampler.gap_layout([([], [1])] * b, cap, method.ids.bos))

    def fn(p, key):
      f, tl = method.split_score_fn(p, cap)
      if counting is not None:
        f, tl = counting.did(f, tl)
      tok, lens, nfe, dropped, _ = did_sampler.fast_did_sample(
          f, tl, key, layout, steps, use_cache=method.variant == "fixed", pad_id=method.ids.pad,
          bos_id=method.ids.bos)
      return dict(tokens=tok, nfe=nfe, lengths=lens)
    return fn, "full", 1.0

  def fn(p, key):
    tok, lens, nfe, dropped = did_sampler.did_sample(
        method.score_fn(p, cap), key, b, steps, cap, method.ids.bos,
        use_cache=method.variant == "fixed", pad_id=method.ids.pad,
        steps_run=None if run_steps == steps else run_steps)
    return dict(tokens=tok, nfe=nfe, lengths=lens)
  return fn, note, run_steps / steps


class Counting:
  """Wraps a Denoiser / DID split so that each trunk pass (by sub-batch size) and each head
  chunk (by rows) is counted through a host callback (profiling runs only)."""

  def __init__(self):
    self.counts = collections.Counter()

  def _hit(self, kind, n):
    import jax  # pylint: disable=g-import-not-at-top
    jax.debug.callback(lambda: self.counts.update([(kind, n)]))

  def __call__(self, den):
    import dataclasses  # pylint: disable=g-import-not-at-top

    def features(tok, valid=None):
      self._hit("trunk", tok.shape[0])
      return den.features(tok, valid)

    def head(h):
      self._hit("head", h.shape[0])
      return den.head(h)
    return dataclasses.replace(den, features=features, head=head)

  def did(self, f, tl):
    def features(*a):
      self._hit("trunk", a[0].shape[0])
      return f(*a)

    def token_fn(h):
      self._hit("head", h.shape[0])
      return tl(h)
    return features, token_fn


def _median_time(fn, reps=3):
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = fn()
    import jax  # pylint: disable=g-import-not-at-top
    jax.block_until_ready(out)
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def profile_fast(decoder, steps, shape, method, params, total_s):
  """Where the fast path's time goes: passes counted in a run with callbacks, each kind of pass
  timed alone (compiled), the rest is the loop's own work (reveal draws, gathers, scatters)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dlm_jax.sampling.common import categorical_f64  # pylint: disable=g-import-not-at-top
  counting = Counting()
  fn, _, _ = make_fn(decoder, "fast", steps, shape, method, 0, counting=counting)
  with jax.enable_x64(True):
    jax.block_until_ready(jax.jit(fn)(params, jax.random.key(1)))
    b, length = shape["batch"], shape["length"]
    tok = jnp.full((b, length), method.ids.mask, jnp.int32)
    parts = {}
    if decoder == "did":
      f, tl = method.split_score_fn(params, length - 1)
      lens = jnp.full((b,), length // 2, jnp.int32)
      t = jnp.ones((b,), jnp.float32)
      trunk = jax.jit(lambda x, n: f(x, lens[:n.shape[0]], t[:n.shape[0]], None))
      hid = f(tok, lens, t, None)[0].reshape(b * length, -1)
      head = jax.jit(lambda h, k: categorical_f64(k, tl(h)))
    else:
      den = method.denoiser(params)
      trunk = jax.jit(lambda x, n: den.features(x, None))
      hid = den.features(tok, None).reshape(b * length, -1)
      if decoder == "threshold":
        head = jax.jit(lambda h, k: jnp.argmax(jax.nn.log_softmax(
            den.head(h).at[:, method.ids.mask].set(-jnp.inf)), -1))
      else:
        head = jax.jit(lambda h, k: categorical_f64(k, den.head(h).astype(jnp.float64).at[
            :, method.ids.mask].set(-jnp.inf)))
    for (kind, n), count in sorted(counting.counts.items()):
      if kind == "trunk":
        x = tok[:n]
        unit = _median_time(lambda: trunk(x, x[:, 0]))
      else:
        h = hid[:n]
        unit = _median_time(lambda: head(h, jax.random.key(0)))
      parts[f"{kind} x{n}"] = dict(calls=count, seconds_each=unit, seconds=count * unit)
  accounted = sum(p["seconds"] for p in parts.values())
  return dict(parts=parts, accounted_s=accounted, rest_s=total_s - accounted, total_s=total_s)


def worker(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_x64", True)  # float64 draws, as `python -m dlm_jax.sample`
  shape = SHAPES[args.shape]
  method, params = build(args.decoder, shape)
  fn, note, frac = make_fn(args.decoder, args.path, args.T, shape, method, args.ref_steps)
  key = jax.random.key(args.seed)
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(params, key).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  rss_before = _status_mib("VmRSS")
  _rss_reset()
  t0 = time.perf_counter()
  out = jax.block_until_ready(compiled(params, key))
  sec = time.perf_counter() - t0
  peak = _status_mib("VmHWM")
  nfe = float(np.mean(np.asarray(out["nfe"])))
  if args.decoder == "threshold" and note != "full":
    # Every pass of an untrained model commits one slot per sample: the full decode makes
    # `length` passes; the partial one made `nfe`.
    frac = nfe / shape["length"]
  res = dict(decoder=args.decoder, path=args.path, T=args.T, shape=args.shape, run=note,
             seconds_run=sec, seconds_per_batch=sec / frac, nfe_run=nfe,
             network_calls_per_sample=nfe / frac, compile_s=compile_s,
             xla_temp_mib=None if temp is None else temp / 2**20,
             rss_before_mib=rss_before, peak_rss_sampling_mib=peak,
             load_1min=os.getloadavg()[0])
  if args.profile and args.path == "fast":
    res["profile"] = profile_fast(args.decoder, args.T, shape, method, params, sec)
  return res


# -- orchestration -------------------------------------------------------------------------------
def _sub(cmd, timeout):
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  out = proc.stdout.strip()
  try:
    return json.loads(out.splitlines()[-1])  # our worker: one line
  except json.JSONDecodeError:  # the published-code driver prints indented JSON last
    return json.loads(out[out.rfind("\n{") + 1:] if "\n{" in out else out)


def run_jax(args, decoder, path, steps, profile=False) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--decoder={decoder}",
         f"--path={path}", f"--T={steps}", f"--shape={args.shape}", f"--seed={args.seed}",
         f"--ref_steps={args.ref_steps}"] + (["--profile"] if profile else [])
  return _sub(cmd, args.timeout)


def run_published(args, steps) -> dict:
  driver = os.path.join(HERE, "published_mdlm", "driver.py")
  cmd = [args.torch_python, driver, f"--mdlm_repo={args.mdlm_repo}", "--mode=sample",
         f"--shape={args.shape if args.shape in ('comparison', 'tiny') else 'comparison'}",
         f"--T={steps}", f"--draw_dtype={args.mdlm_draw}"]
  if args.shape == "tiny":
    raise SystemExit("--mdlm_repo needs --shape=comparison (the driver's tiny shape differs).")
  if args.ref_steps and args.ref_steps < steps:
    cmd.append(f"--max_steps={args.ref_steps}")
  out = _sub(cmd, args.timeout)
  if out.get("complete", True) and "seconds_per_batch" in out:
    sec, calls, note = out["seconds_per_batch"], out["network_calls"], "full"
  else:
    part = out["partial"]
    # A step costs its draw and update; a network call its forward. Calls over the full run are
    # extrapolated in proportion (the reveal rate per step is constant in expectation).
    sec = part["seconds_per_step"] * steps
    calls = part["network_calls"] * steps / part["steps"]
    note = f"first {part['steps']} of {steps} steps, extrapolated"
  return dict(decoder="ancestral", path="published", T=steps, run=note, seconds_per_batch=sec,
              network_calls_per_sample=calls, peak_rss_sampling_mib=out.get("peak_rss_mib"),
              mdlm_commit=out.get("mdlm_commit"), torch=out.get("torch"),
              draw=out.get("draw_dtype"), time_split_s=out.get("time_split_s"),
              load_1min=out.get("load_average_1min_at_end"))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--decoder", default="ancestral", help=argparse.SUPPRESS)
  ap.add_argument("--path", default="fast", help=argparse.SUPPRESS)
  ap.add_argument("--T", type=int, default=128, help=argparse.SUPPRESS)
  ap.add_argument("--shape", choices=tuple(SHAPES), default="comparison")
  ap.add_argument("--steps", default="128,1000", help="comma list of T")
  ap.add_argument("--decoders", default=",".join(DECODERS))
  ap.add_argument("--paths", default="reference,fast", help="reference, fast (or one of them)")
  ap.add_argument("--rounds", type=int, default=1, help="alternating rounds (median reported)")
  ap.add_argument("--ref_steps", type=int, default=0,
                  help="time only the first K steps (threshold: passes) of the reference loops and "
                       "the published code, and extrapolate (0: full runs)")
  ap.add_argument("--profile", action="store_true", help="profile the fast path (a second run)")
  ap.add_argument("--profile_decoders", default="",
                  help="with --profile: only these decoders (comma list; default all)")
  ap.add_argument("--mdlm_repo", default="", help="checkout of github.com/kuleshov-group/mdlm")
  venv_torch = os.path.join(ROOT, ".venv-torch", "bin", "python")
  ap.add_argument("--torch_python", default=os.environ.get("TORCH_PYTHON") or (
      venv_torch if os.path.exists(venv_torch) else "python3"),
                  help="python of a venv with torch & co (benchmarks/published_mdlm/README.md; "
                       "default $TORCH_PYTHON or .venv-torch/bin/python)")
  ap.add_argument("--mdlm_draw", choices=("float64", "as_published"), default="float64")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--timeout", type=int, default=4 * 3600)
  ap.add_argument("--out", default="", help="write all results as JSON here")
  args = ap.parse_args()
  if args.worker:
    print(json.dumps(worker(args)))
    return
  steps_list = [int(s) for s in args.steps.split(",") if s]
  decoders = [d for d in args.decoders.split(",") if d]
  paths = [p for p in args.paths.split(",") if p]
  if args.mdlm_repo:
    commit = subprocess.run(["git", "-C", args.mdlm_repo, "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"published MDLM checkout {args.mdlm_repo} at commit {commit or '(not a git checkout)'}",
          flush=True)
  variants = []
  for d in decoders:
    for t in (steps_list if d != "threshold" else steps_list[:1]):
      for p in paths:
        variants.append((d, p, t))
      if d == "ancestral" and args.mdlm_repo:
        variants.append((d, "published", t))
  results = collections.defaultdict(list)
  for r in range(args.rounds):
    for d, p, t in variants:
      label = f"round {r + 1}: {d} {p} T={t if d != 'threshold' else '-'}"
      print(label, "...", flush=True)
      prof = (args.profile and p == "fast" and r == 0
              and (not args.profile_decoders or d in args.profile_decoders.split(",")))
      res = run_published(args, t) if p == "published" else run_jax(args, d, p, t, profile=prof)
      print(f"  {res['seconds_per_batch']:.2f} s/batch ({res['run']}), "
            f"{res['network_calls_per_sample']:.1f} calls/sample, "
            f"peak {res.get('peak_rss_sampling_mib') or float('nan'):.0f} MiB, "
            f"load {res.get('load_1min') or float('nan'):.1f}", flush=True)
      if "profile" in res:
        print("  profile: " + json.dumps(res["profile"]), flush=True)
      results[(d, t)].append(dict(res, round=r + 1))
      if args.out:  # after every measurement: a stopped run keeps what it measured
        with open(args.out, "w") as f:
          json.dump([dict(v, key=list(k)) for k, vs in results.items() for v in vs], f, indent=1)
  report(results, args)
  if args.out:
    with open(args.out, "w") as f:
      json.dump([dict(v, key=list(k)) for k, vs in results.items() for v in vs], f, indent=1)


def report(results, args) -> None:
  print(f"\n== sampling cost, shape {args.shape} {SHAPES[args.shape]}, untrained weights, "
        f"float64 draws; median over {args.rounds} round(s) ==")
  print("| decoder | T | path | s/batch | network calls/sample | peak RSS sampling (MiB) | "
        "XLA temp (MiB) | run |")
  print("|---|---|---|---|---|---|---|---|")
  for (d, t), rs in results.items():
    by = collections.defaultdict(list)
    for r in rs:
      by[r["path"]].append(r)
    for p, lst in by.items():
      med = statistics.median(x["seconds_per_batch"] for x in lst)
      calls = statistics.median(x["network_calls_per_sample"] for x in lst)
      peak = statistics.median(x.get("peak_rss_sampling_mib") or 0 for x in lst)
      temp = lst[0].get("xla_temp_mib")
      print(f"| {d} | {t if d != 'threshold' else '-'} | {p} | {med:.2f} | {calls:.1f} | "
            f"{peak:.0f} | {'' if temp is None else f'{temp:.0f}'} | {lst[0]['run']} |")
    for base in ("reference", "published"):
      if base in by and "fast" in by:
        ratios = []
        for a, f in zip(sorted(by[base], key=lambda x: x["round"]),
                        sorted(by["fast"], key=lambda x: x["round"])):
          ratios.append(a["seconds_per_batch"] / f["seconds_per_batch"])
        print(f"|   | | fast vs {base}: **{statistics.median(ratios):.1f}x** faster "
              f"(rounds: {', '.join(f'{x:.1f}' for x in ratios)}) | | | | | |")
  for (d, t), rs in results.items():
    for r in rs:
      if "profile" in r:
        pr = r["profile"]
        print(f"\nprofile, {d} fast T={t} ({pr['total_s']:.2f} s): ")
        for name, part in pr["parts"].items():
          print(f"  {name:14s} {part['calls']:6d} calls x {part['seconds_each'] * 1e3:8.2f} ms = "
                f"{part['seconds']:7.2f} s ({part['seconds'] / pr['total_s']:.0%})")
        print(f"  rest (reveal draws, gathers, scatters, loop) {pr['rest_s']:.2f} s "
              f"({pr['rest_s'] / pr['total_s']:.0%})")
      if r.get("mdlm_commit"):
        print(f"published: commit {r['mdlm_commit']}, torch {r.get('torch')}, draws {r.get('draw')}")
        break


if __name__ == "__main__":
  main()
