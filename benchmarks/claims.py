r"""Recomputes, from the saved benchmark JSON, the spread or interval behind every ordering and
difference the README states for TRIMS, fast decoding, the DID toy and training throughput.

  python benchmarks/claims.py            # reads benchmarks/results/*.json and train_throughput.txt

Nothing is re-run: this reads what the benchmarks saved, so a README claim can be checked against
its data in a second. Conventions (stated again in each section):
- per-seed differences are paired by seed (same SFT seed and test prompts for TRIMS arms, same
  prompt set for decoders, common random numbers for schedules); with 3 seeds the 95% interval
  of a mean difference is mean +- t(0.975, 2) s / sqrt(3) with t = 4.303;
- accuracy differences of two decoders on the same 3,000 prompts: Newcombe's hybrid score
  interval from the two Wilson intervals, which treats the two proportions as independent and
  is wide (conservative) when the decoders succeed on the same prompts;
- a difference is "resolved" when its 95% interval excludes 0.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dlm_jax.metrics import wilson_interval  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 8: 2.306, 10: 2.228}


def mean_ci(xs):
  """(mean, sd, lo, hi): 95% t-interval of the mean of xs."""
  n = len(xs)
  m = statistics.fmean(xs)
  sd = statistics.stdev(xs) if n > 1 else float("nan")
  half = T975[n - 1] * sd / math.sqrt(n) if n > 1 else float("nan")
  return m, sd, m - half, m + half


def verdict(lo, hi):
  return "resolved" if lo > 0 or hi < 0 else "NOT resolved"


def newcombe(k1, n1, k2, n2):
  """95% interval of p1 - p2 (Newcombe 1998, method 10) from two Wilson intervals."""
  p1, p2 = k1 / n1, k2 / n2
  l1, u1 = wilson_interval(k1, n1)
  l2, u2 = wilson_interval(k2, n2)
  d = p1 - p2
  return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def fisher_spearman_ci(r, n):
  """Approximate 95% interval of a Spearman correlation (Fisher z, s.e. 1.06 / sqrt(n - 3))."""
  z, se = math.atanh(r), 1.06 / math.sqrt(n - 3)
  return math.tanh(z - 1.96 * se), math.tanh(z + 1.96 * se)


def trims():
  d = json.load(open(os.path.join(RESULTS, "trims_toy.json")))
  arms = d["aggregate"]["arms"]
  print("## TRIMS toy (3 SFT seeds; arms share the SFT seed and the 1,000 test prompts)")
  aup = {a: v["aup_tpf_gen_per_seed"] for a, v in arms.items() if "aup_tpf_gen_per_seed" in v}
  for a, xs in sorted(aup.items(), key=lambda kv: -statistics.fmean(kv[1])):
    m, sd, _, _ = mean_ci(xs)
    print(f"  AUP(TPF_gen) {a:7s} {m:5.1f} +- {sd:3.1f} (per seed {', '.join(f'{x:.1f}' for x in xs)})")
  order = sorted(aup, key=lambda a: -statistics.fmean(aup[a]))
  pairs = list(zip(order, order[1:])) + [
      ("S-u", "S"), ("T-easy", "T-rand"), ("T-easy", "S"), ("T-easy", "T-hard"),
      ("S-u", "T-hard"), ("T-rand", "T-hard")]
  for a, b in pairs:
    diff = [x - y for x, y in zip(aup[a], aup[b])]
    m, _, lo, hi = mean_ci(diff)
    print(f"  AUP {a} - {b}: {m:+.1f} (per seed {', '.join(f'{x:+.1f}' for x in diff)}; "
          f"95% CI {lo:+.1f} .. {hi:+.1f}: {verdict(lo, hi)})")
  per_run = d["per_run"]

  def acc(arm, setting):
    return [next(p["accuracy"] for p in per_run[arm][s]["points"] if p["setting"] == setting)
            for s in sorted(per_run[arm])]

  def tpf(arm, setting):
    return [next(p["tpf_gen"] for p in per_run[arm][s]["points"] if p["setting"] == setting)
            for s in sorted(per_run[arm])]

  for a, b in (("T-easy", "T-hard"), ("T-easy", "S-u"), ("T-easy", "S")):
    for setting in ("1tok", "tau=0.3"):
      diff = [x - y for x, y in zip(acc(a, setting), acc(b, setting))]
      m, _, lo, hi = mean_ci(diff)
      print(f"  accuracy {setting} {a} - {b}: {m:+.1f} points (per seed "
            f"{', '.join(f'{x:+.1f}' for x in diff)}; 95% CI {lo:+.1f} .. {hi:+.1f}: {verdict(lo, hi)})")
  for a in ("T-hard", "T-rand", "T-easy"):
    for b in ("S", "S-u"):
      diff = [x - y for x, y in zip(tpf(a, "tau=0.3"), tpf(b, "tau=0.3"))]
      m, _, lo, hi = mean_ci(diff)
      print(f"  TPF_gen tau=0.3 {a} - {b}: {m:+.3f} (per seed {', '.join(f'{x:+.3f}' for x in diff)}; "
            f"95% CI {lo:+.3f} .. {hi:+.3f}: {verdict(lo, hi)})")


def decoding():
  d = json.load(open(os.path.join(RESULTS, "decoding.json")))
  a = d["arith"]
  ps = a["per_seed"]
  print("\n## Fast decoding, ARITH-CHAIN (one student; 3 disjoint sets of 1,000 prompts)")

  def tot(name):
    return sum(r["correct"] for r in ps[name]), sum(r["n"] for r in ps[name])

  def nfe(name):
    return [r["mean_nfe"] for r in ps[name]]

  base, r2, t09, t07 = "1 token/pass", "0.9 + all R²", "threshold 0.9", "threshold 0.7"
  red = [1 - x / y for x, y in zip(nfe(r2), nfe(t09))]
  m, _, lo, hi = mean_ci(red)
  print(f"  R² (all rules) vs tau 0.9: {100 * m:.2f}% fewer forwards (per prompt set "
        f"{', '.join(f'{100 * x:.2f}%' for x in red)}; 95% CI {100 * lo:.2f}..{100 * hi:.2f}%), "
        f"correct {tot(r2)[0]} vs {tot(t09)[0]} of {tot(r2)[1]}")
  h = a["headline"]
  print(f"  R² vs the plain-threshold frontier interpolated to R²'s accuracy: "
        f"{a['table'][[r['decoder'] for r in a['table']].index(r2)]['mean_nfe']:.2f} vs "
        f"{h['threshold_frontier_nfe_at_all_rules_accuracy']:.2f} forwards = "
        f"{-100 * h['nfe_reduction_all_rules_vs_frontier']:+.1f}% (R² takes MORE when positive); "
        f"the interpolation spans accuracies {tot(t09)[0]} and {tot(t07)[0]} correct of 3,000")
  d07, lo07, hi07 = newcombe(*tot(t07), *tot(r2))
  print(f"  tau 0.7 vs R²: {statistics.fmean(nfe(t07)):.2f} vs {statistics.fmean(nfe(r2)):.2f} "
        f"forwards; accuracy {100 * d07:+.2f} points (95% CI {100 * lo07:+.2f}..{100 * hi07:+.2f})")
  for name in ("threshold 0.1", "threshold 0.2", "threshold 0.3", "threshold 0.5"):
    dd, lo, hi = newcombe(*tot(name), *tot(base))
    per = [100 * (x["correct"] - y["correct"]) / x["n"] for x, y in zip(ps[name], ps[base])]
    m, _, tlo, thi = mean_ci(per)
    print(f"  {name} vs 1 token/pass: accuracy {100 * dd:+.2f} points (Newcombe 95% CI "
          f"{100 * lo:+.2f}..{100 * hi:+.2f}: {verdict(lo, hi)}; per prompt set "
          f"{', '.join(f'{x:+.1f}' for x in per)}, t-interval {tlo:+.2f}..{thi:+.2f}); "
          f"forwards {statistics.fmean(nfe(name)):.2f} vs 24")

  hm = d["hmm"]
  rows = [r for r in hm["rows"] if len(r["light_segments"]) == 2]
  rows.sort(key=lambda r: r["delta_vs_all_h"])
  best = rows[0]
  print(f"\n## HMM-16 scheduling ({len(rows)} placements of 2 light segments; deltas are paired "
        "with all-H, +- s.e.)")
  near = [r for r in rows
          if r["delta_vs_all_h"] - best["delta_vs_all_h"]
          <= 2 * math.sqrt(r["delta_se"] ** 2 + best["delta_se"] ** 2)]
  print(f"  best {best['schedule']} {best['delta_vs_all_h']:+.3f} +- {best['delta_se']:.3f}; "
        f"{len(near)} placements lie within 2 combined s.e. of it (ranks 1..{len(near)}; "
        "treating two deltas as independent)")
  by_name = {n: r for r in rows for n in r["names"]}
  for name in ("sandwich 2", "middle 2", "prefix 2", "suffix 2"):
    r = by_name[name]
    print(f"  {name} {r['schedule']}: rank {rows.index(r) + 1}/{len(rows)}, "
          f"{r['delta_vs_all_h']:+.3f} +- {r['delta_se']:.3f}")
  s, mid = by_name["sandwich 2"], by_name["middle 2"]
  diff = mid["delta_vs_all_h"] - s["delta_vs_all_h"]
  se = math.sqrt(mid["delta_se"] ** 2 + s["delta_se"] ** 2)
  print(f"  middle - sandwich: {diff:+.3f} nats, {diff / se:.1f} combined s.e. "
        f"(95% CI {diff - 1.96 * se:+.3f}..{diff + 1.96 * se:+.3f}: {verdict(diff - 1.96 * se, diff + 1.96 * se)})")
  first = [r["delta_vs_all_h"] for r in rows if 0 in r["light_segments"]]
  second = [r["delta_vs_all_h"] for r in rows if 1 in r["light_segments"] and 0 not in r["light_segments"]]
  print(f"  placements with segment 0 light: ranks {[rows.index(r) + 1 for r in rows if 0 in r['light_segments']]}, "
        f"mean {statistics.fmean(first):+.3f}; with segment 1 (not 0): mean {statistics.fmean(second):+.3f}, ranks "
        f"{[rows.index(r) + 1 for r in rows if 1 in r['light_segments'] and 0 not in r['light_segments']]}")
  for key, p in hm["predicted_best"].items():
    lo, hi = fisher_spearman_ci(p["spearman"], len(rows))
    print(f"  {key}: Spearman {p['spearman']:+.2f} (approx. 95% CI {lo:+.2f}..{hi:+.2f}, measured ranks "
          f"taken as exact), predicted best {tuple(p['placement'])} measured rank {p['measured_rank']}")
  allh = next(r for r in hm["rows"] if r["names"] == ["all-H"])
  print(f"  entropy all-H {allh['entropy']:.4f}, best {best['entropy']:.4f}: "
        f"{best['entropy'] - allh['entropy']:+.4f} (no per-seed entropies saved: no interval)")

  tx = d["text"]
  print("\n## Tiny text scheduling (3 sampling seeds x 32 samples; seed s.d. of gen-PPL)")
  sch = {r["schedule"]: r for r in tx["schedules"]}
  h = sch["all-H"]
  for name, r in sch.items():
    if name == "all-H":
      continue
    diff = r["gen_ppl"] - h["gen_ppl"]
    se = math.sqrt((r["gen_ppl_seed_sd"] ** 2 + h["gen_ppl_seed_sd"] ** 2) / 3)
    lo, hi = diff - T975[2] * se, diff + T975[2] * se
    print(f"  {name:13s} {100 * r['rel_gen_ppl_vs_all_h']:+5.1f}% gen-PPL vs all-H "
          f"(seed s.d. {r['gen_ppl_seed_sd']:.0f} vs {h['gen_ppl_seed_sd']:.0f}; Welch-style 95% CI of the "
          f"difference {100 * lo / h['gen_ppl']:+.1f}..{100 * hi / h['gen_ppl']:+.1f}%: {verdict(lo, hi)}), "
          f"saving {100 * r['saving_blocks']:.1f}% FLOPs (blocks)")


def did_toy():
  path = os.path.join(RESULTS, "did_toy.json")
  if not os.path.exists(path):
    return
  d = json.load(open(path))
  print("\n## DID toy (3 sampling seeds x 32 samples per model and step count; different models, so "
        "differences are treated as independent: Welch-style, t with 2 d.o.f.)")
  per = {}
  for r in d["records"]:
    per.setdefault((r["method"], r["steps"]), {})[r["seed"]] = r
  steps = sorted({s for _, s in per})

  def diff_ci(xs, ys):
    diff = statistics.fmean(xs) - statistics.fmean(ys)
    se = math.sqrt((statistics.variance(xs) + statistics.variance(ys)) / len(xs))
    return diff, diff - T975[2] * se, diff + T975[2] * se

  for key in ("gen_ppl", "mean_len"):
    for s in steps:
      did = [per[("did", s)][k][key] for k in sorted(per[("did", s)])]
      mdlm = [per[("mdlm", s)][k][key] for k in sorted(per[("mdlm", s)])]
      diff, lo, hi = diff_ci(did, mdlm)
      print(f"  T={s:3d} {key}: DID {statistics.fmean(did):7.1f} +- {statistics.stdev(did):5.1f}, MDLM "
            f"{statistics.fmean(mdlm):7.1f} +- {statistics.stdev(mdlm):5.1f}; DID - MDLM {diff:+7.1f} "
            f"(95% CI {lo:+.1f}..{hi:+.1f}: {verdict(lo, hi)})")
  for method in ("mdlm", "did"):
    few, many = (per[(method, s)] for s in (steps[0], steps[-1]))
    xs = [few[k]["gen_ppl"] for k in sorted(few)]
    ys = [many[k]["gen_ppl"] for k in sorted(many)]
    diff, lo, hi = diff_ci(xs, ys)
    print(f"  {method} gen-PPL T={steps[0]} - T={steps[-1]}: {diff:+.1f} (95% CI {lo:+.1f}..{hi:+.1f}: "
          f"{verdict(lo, hi)})")


def throughput():
  for name in sorted(os.listdir(RESULTS)):
    if name.startswith("train_throughput") and name.endswith(".txt"):
      _throughput_file(name)


def _throughput_file(name):
  print(f"\n## Training throughput ({name}: per-round ratios)")
  text = open(os.path.join(RESULTS, name)).read()
  for block in re.split(r"\n(?=\[)", text):
    m = re.match(r"\[(\w+)\]", block)
    if not m:
      continue
    ratios = [float(x) for x in re.findall(r"ratio ([0-9.]+)x", block)]
    if ratios:
      print(f"  [{m.group(1)}] rounds {ratios}: median {statistics.median(ratios):.2f}x, "
            f"range {min(ratios):.2f}..{max(ratios):.2f}x")
    for line in block.splitlines():
      if "median" in line and "throughput" in line and "/" in line:
        print("  " + line.strip())


def main():
  trims()
  decoding()
  did_toy()
  throughput()


if __name__ == "__main__":
  main()
