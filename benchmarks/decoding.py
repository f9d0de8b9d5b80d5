r"""Fast decoding, measured side by side: R²-dLLM rules on threshold decoding, and heavy/light
model scheduling.

  python benchmarks/decoding.py                      # everything, the spec's CPU budgets (~45 min)
  python benchmarks/decoding.py --arith_workdir=workdirs/trims_toy/pretrain   # reuse the TRIMS
                                                     # toy's base student (as in the README)
  python benchmarks/decoding.py --parts=arith,hmm --root=/tmp/dec/bench

Three parts (spec/decoding.md), each with >= 3 seeds:
- arith (toy R): the ARITH-CHAIN MDLM student (configs/arith_pretrain.py) decodes
  held-out prompts (greedy, block 8, 24 slots) with one token per pass, threshold decoding
  (tau 0.9 plus a 0.7 ... 0.1 frontier), tau 0.9 + each R² rule and 0.9 / 0.5 / 0.3 + all rules. Exact-match
  accuracy (95% Wilson interval), valid-trace rate, NFE, TPF_gen / TPF_content, FLOPs per sample,
  wall time per sample, commits per rule. A seed is a disjoint set of held-out prompts.
- hmm (toy S): heavy (configs/hmm_heavy.py: d 64, 4 blocks) and light (configs/hmm_light.py:
  d 32, 1 block) MDLMs on HMM-16; ancestral sampling, T = 32, cache off, float64 inverse-CDF
  draws with common random numbers shared by all schedules (paired differences), BOS/PAD
  suppressed in generated slots (the evaluator scores symbols 0..15 only). Schedules:
  all-H, all-L, the 28 placements of 2 light segments of 4 steps among 8, and the prefix /
  suffix / sandwich / middle families at 1-4 light segments. gen-NLL under the smoothed
  evaluator (exact forward algorithm), sample unigram entropy, FLOPs (both conventions).
  Step importance: Delta_CE(t), KL(t) on held-out data, trajectory KL, predictions, search.
- text: mdlm_tiny (heavy, 4 blocks) and mdlm_tiny_light (1 block) on the embedded corpus,
  judged by the repository's AR model (configs/ar_tiny.py): schedules at 25% light steps
  (ancestral, T = 64, 48 generated tokens, cache on, NFE-based FLOPs), and the decoders of the
  arith part on prefix prompts from held-out verses (greedy), with gen-PPL and entropy.

Checkpoints live under --root; a run whose checkpoint exists is reused, otherwise it is trained
here with the step budgets below (the training time is recorded). Results: markdown, JSON and
PNG plots in --out (default benchmarks/results/). Ratios and targets are reported, never
asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dlm_jax.run import api  # noqa: E402
from dlm_jax import parallel  # noqa: E402
from dlm_jax.evaluation import gen_ppl as gen_ppl_lib  # noqa: E402
from dlm_jax import metrics as metrics_lib
from dlm_jax.scheduling import step_importance as si  # noqa: E402
from dlm_jax.data.tasks import arith as arith_task, hmm as hmm_task
from dlm_jax.scheduling import schedule as ms
from dlm_jax.scheduling import flops as flops_lib  # noqa: E402
from dlm_jax.scheduling import sampler as scheduled
from dlm_jax.metrics import wilson_interval  # noqa: E402

RULES = ("threshold", "conf_cluster", "token_cluster", "temporal")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def ensure_run(root: str, name: str, config: str, steps: int, log: dict,
               extra: tuple[str, ...] = ()) -> str:
  """Returns root/name, training it with `config` for `steps` steps when it has no checkpoint.

  `extra` are more --config.* flags for the training command.
  """
  wd = os.path.join(root, name)
  ckpts = os.path.join(wd, "checkpoints")
  if os.path.isdir(ckpts) and any(s.isdigit() for s in os.listdir(ckpts)):
    log[name] = dict(reused=True, workdir=wd)
    return wd
  every = max(steps // 2, 1)
  cmd = [sys.executable, "-m", "dlm_jax.train", f"--config={config}", f"--workdir={wd}",
         f"--config.train.num_steps={steps}", f"--config.train.ckpt_every={every}",
         f"--config.train.eval_every={every}", "--config.train.print_batch=false", *extra]
  print("training:", " ".join(cmd[2:]), flush=True)
  t0 = time.perf_counter()
  os.makedirs(root, exist_ok=True)
  with open(wd + ".log", "w") as f:
    r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  if r.returncode:
    raise RuntimeError(f"training {name} failed; see {wd}.log")
  log[name] = dict(reused=False, workdir=wd, steps=steps, train_sec=time.perf_counter() - t0,
                   extra=list(extra))
  return wd


def last_metrics(wd: str) -> dict:
  path = os.path.join(wd, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  out = {}
  for line in open(path):
    out.update(json.loads(line))
  return {k: v for k, v in out.items() if k.startswith(("eval/", "step"))}


def _sample_cfg(run, **kw) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict(run.config.sample.to_dict())
  for k, v in kw.items():
    s[k] = v
  return s


def _mean_sd(xs) -> tuple[float, float]:
  xs = np.asarray(xs, np.float64)
  return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else 0.0


DECODERS = (
    ("1 token/pass", dict(decoder="fixed_k", r2="")),
    ("threshold 0.9", dict(decoder="threshold", tau=0.9, r2="")),
    ("threshold 0.7", dict(decoder="threshold", tau=0.7, r2="")),
    ("threshold 0.5", dict(decoder="threshold", tau=0.5, r2="")),
    ("threshold 0.3", dict(decoder="threshold", tau=0.3, r2="")),
    ("threshold 0.2", dict(decoder="threshold", tau=0.2, r2="")),
    ("threshold 0.1", dict(decoder="threshold", tau=0.1, r2="")),
    ("0.9 + conf", dict(decoder="threshold", tau=0.9, r2="conf")),
    ("0.9 + token", dict(decoder="threshold", tau=0.9, r2="token")),
    ("0.9 + stability", dict(decoder="threshold", tau=0.9, r2="stability")),
    ("0.9 + all R²", dict(decoder="threshold", tau=0.9, r2="conf,token,stability")),
    ("0.5 + all R²", dict(decoder="threshold", tau=0.5, r2="conf,token,stability")),
    ("0.3 + all R²", dict(decoder="threshold", tau=0.3, r2="conf,token,stability")),
)
FRONTIER = ("threshold 0.7", "threshold 0.5", "threshold 0.3", "threshold 0.2", "threshold 0.1",
            "0.5 + all R²", "0.3 + all R²")


def run_decoder(run, prompts: np.ndarray, gen_len: int, block_len: int, opts: dict,
                key: jax.Array, warm: bool) -> dict:
  """One decoder on a prompt batch; returns tokens, nfe, commit_rule and wall seconds."""
  n = prompts.shape[0]
  s = _sample_cfg(run, batch_size=n, num_samples=n, gen_len=gen_len, block_len=block_len,
                  num_steps=gen_len, **opts)
  fn = lambda: jax.device_get(run.method.sample(run.params, key, s, prompt=prompts))  # noqa
  with parallel.sharding_context(run.mesh):
    if warm:
      fn()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
  out["wall_sec"] = wall
  return out


def _commit_counts(out) -> dict:
  rules = np.asarray(out["commit_rule"])
  return {name: int(np.sum(rules == i)) for i, name in enumerate(RULES)}


def _flops_per_pass(run, seq_len: int, conv: str = "full") -> float:
  return flops_lib.model_forward_flops(flops_lib.flops_model_config(run.config, run.tokenizer.vocab_size,
                                                             seq_len), conv)


# ---------------------------------------------------------------------------------------------
# Part R: ARITH-CHAIN
# ---------------------------------------------------------------------------------------------
def part_arith(args, log) -> dict:
  if args.arith_workdir:  # e.g. the base student of benchmarks/trims_toy.py (spec: the same model)
    wd = args.arith_workdir
    log["arith"] = dict(reused=True, workdir=wd)
  else:
    wd = ensure_run(args.root, "arith", "configs/arith_pretrain.py", args.arith_steps, log)
  run = api.load(wd)
  task = arith_task.ArithChain()
  gen_len, block = 24, 8
  rows = {}
  fpp = _flops_per_pass(run, task.prompt_len + gen_len)
  for seed in args.seeds:
    ex = task.generate([0xDEC0DE, seed], args.arith_prompts)
    prompts = ex["prompt"].astype(np.int32)
    for name, opts in DECODERS:
      out = run_decoder(run, prompts, gen_len, block, opts, jax.random.key(seed),
                        warm=seed == args.seeds[0])
      resp = np.asarray(out["tokens"])[:, task.prompt_len:]
      full = np.concatenate([resp, np.full((resp.shape[0], 1), arith_task.EOS, np.int32)], 1)
      correct = arith_task.exact_match(full, ex["answer"])
      valid = task.valid_traces(prompts, full)
      nfe = np.asarray(out["nfe"], np.float64)
      content = np.where((resp == arith_task.EOS).any(1), (resp == arith_task.EOS).argmax(1), gen_len)
      rec = dict(n=len(nfe), correct=int(correct.sum()), valid=int(valid.sum()),
                 accuracy=float(correct.mean()), valid_rate=float(valid.mean()),
                 mean_nfe=float(nfe.mean()), tpf_gen=gen_len * len(nfe) / nfe.sum(),
                 tpf_content=float(content.sum() / nfe.sum()),
                 flops_per_sample=float(nfe.mean() * fpp),
                 wall_ms_per_sample=1e3 * out["wall_sec"] / len(nfe),
                 commits=_commit_counts(out))
      rows.setdefault(name, []).append(rec)
      print(f"arith seed {seed} {name:16s} acc {rec['accuracy']:.3f} nfe {rec['mean_nfe']:.2f} "
            f"tpf {rec['tpf_gen']:.2f} commits {rec['commits']}", flush=True)
  table = []
  for name, _ in DECODERS:
    recs = rows[name]
    k, n = sum(r["correct"] for r in recs), sum(r["n"] for r in recs)
    lo, hi = wilson_interval(k, n)
    commits = {c: sum(r["commits"][c] for r in recs) for c in RULES}
    table.append(dict(
        decoder=name, n=n, accuracy=k / n, acc_lo=lo, acc_hi=hi,
        acc_seed_sd=_mean_sd([r["accuracy"] for r in recs])[1],
        valid_rate=sum(r["valid"] for r in recs) / n,
        mean_nfe=_mean_sd([r["mean_nfe"] for r in recs])[0],
        nfe_seed_sd=_mean_sd([r["mean_nfe"] for r in recs])[1],
        tpf_gen=_mean_sd([r["tpf_gen"] for r in recs])[0],
        tpf_content=_mean_sd([r["tpf_content"] for r in recs])[0],
        flops_per_sample=_mean_sd([r["flops_per_sample"] for r in recs])[0],
        wall_ms_per_sample=_mean_sd([r["wall_ms_per_sample"] for r in recs])[0],
        commits=commits))
  by = {r["decoder"]: r for r in table}
  base = by["1 token/pass"]
  for r in table:
    r["nfe_reduction_vs_1tok"] = 1 - r["mean_nfe"] / base["mean_nfe"]
    r["acc_change_points_vs_1tok"] = 100 * (r["accuracy"] - base["accuracy"])
  # Iso-accuracy comparison of all rules with the plain-threshold frontier (linear in accuracy).
  allr = by["0.9 + all R²"]
  front = sorted((r for r in table if r["decoder"].startswith("threshold ")),
                 key=lambda r: r["accuracy"])
  accs = [r["accuracy"] for r in front]
  nfes = [r["mean_nfe"] for r in front]
  iso = float(np.interp(allr["accuracy"], accs, nfes)) if max(accs) > min(accs) else nfes[-1]
  headline = dict(
      nfe_reduction_all_rules_vs_1tok=allr["nfe_reduction_vs_1tok"],
      acc_change_points_all_rules_vs_1tok=allr["acc_change_points_vs_1tok"],
      nfe_reduction_all_rules_vs_tau09=1 - allr["mean_nfe"] / by["threshold 0.9"]["mean_nfe"],
      threshold_frontier_nfe_at_all_rules_accuracy=iso,
      nfe_reduction_all_rules_vs_frontier=1 - allr["mean_nfe"] / iso,
      target_met=bool(allr["nfe_reduction_vs_1tok"] >= 0.8
                      and allr["acc_change_points_vs_1tok"] >= -1.0))
  best = max((r for r in table if r["acc_change_points_vs_1tok"] >= -1.0),
             key=lambda r: r["nfe_reduction_vs_1tok"])
  headline["best_within_1pt"] = dict(decoder=best["decoder"],
                                     nfe_reduction=best["nfe_reduction_vs_1tok"],
                                     target_met=bool(best["nfe_reduction_vs_1tok"] >= 0.8))
  return dict(table=table, per_seed=rows, headline=headline, run=last_metrics(wd),
              settings=dict(prompts_per_seed=args.arith_prompts, gen_len=gen_len, block_len=block,
                            seeds=args.seeds, train_steps=run.step, workdir=wd))


# ---------------------------------------------------------------------------------------------
# Part S: HMM-16 model scheduling
# ---------------------------------------------------------------------------------------------
def _hmm_schedules(num_seg: int, seg_len: int) -> dict[str, tuple[int, ...]]:
  out = {"all-H": (), "all-L": tuple(range(num_seg))}
  for p in ms.enumerate_placements(num_seg, 2):
    out[f"pair {p}"] = p
  for k in (1, 2, 3, 4):
    for fam in ms.FAMILIES:
      out[f"{fam} {k}"] = ms.family_placement(fam, num_seg, k)
  return out


def part_hmm(args, log) -> dict:
  wh = ensure_run(args.root, "hmm_heavy", "configs/hmm_heavy.py", args.hmm_heavy_steps, log)
  wl = ensure_run(args.root, "hmm_light", "configs/hmm_light.py", args.hmm_light_steps, log)
  heavy, light = api.load(wh), api.load(wl)
  scheduled.check_pair_configs(heavy.config, light.config)
  scheduled.check_pair_tokenizers(heavy.tokenizer, light.tokenizer)
  hmm = hmm_task.HMM16()
  evaluator = hmm.smoothed(1e-3)
  num_seg, seg_len, t_steps, length = 8, 4, 32, 32
  n = args.hmm_samples
  # Samples must be plain symbols for the exact evaluator: BOS/PAD are never drawn.
  sampler = scheduled.ScheduledSampler(heavy.method, light.method,
                                       suppress_ids=(hmm_task.HMM_BOS, hmm_task.HMM_PAD))
  s = _sample_cfg(heavy, batch_size=n, num_samples=n, gen_len=length, t_final=0.0,
                  use_cache=False, decoder="ancestral", num_steps=t_steps)
  fh_cfg = flops_lib.flops_model_config(heavy.config, heavy.tokenizer.vocab_size, length + 1)
  fl_cfg = flops_lib.flops_model_config(light.config, light.tokenizer.vocab_size, length + 1)
  named = _hmm_schedules(num_seg, seg_len)
  placements = sorted(set(named.values()), key=lambda p: (len(p), p))
  per_seed: dict[tuple, list] = {p: [] for p in placements}
  prompt = np.full((n, 1), hmm_task.HMM_BOS, np.int32)
  for seed in args.seeds:
    uni = jax.random.uniform(jax.random.key(1000 + seed), (t_steps, n, length + 1),
                             jnp.float64)
    for p in placements:
      sched = ms.ModelSchedule.from_placement(p, num_seg, seg_len)
      t0 = time.perf_counter()
      with parallel.sharding_context(heavy.mesh):
        out = jax.device_get(sampler.sample(heavy.params, light.params, jax.random.key(seed), s,
                                            sched, prompt=prompt, uniforms=uni))
      wall = time.perf_counter() - t0
      x = np.asarray(out["tokens"])[:, 1:]
      nll = -evaluator.log_prob(x) / length
      ent = [gen_ppl_lib.unigram_entropy(r) for r in x]
      per_seed[p].append(dict(gen_nll=float(nll.mean()), entropy=float(np.mean(ent)),
                              nfe_heavy=float(np.mean(out["nfe_heavy"])),
                              nfe_light=float(np.mean(out["nfe_light"])), wall=wall,
                              nll_per_sample=nll))
    print(f"hmm seed {seed}: all-H {per_seed[()][-1]['gen_nll']:.4f} all-L "
          f"{per_seed[tuple(range(num_seg))][-1]['gen_nll']:.4f}", flush=True)
  # Step importance (held-out data and heavy trajectories).
  x0 = hmm.sample([0x5E1D, 0], args.hmm_curve_seqs, length)
  x0 = np.concatenate([np.full((len(x0), 1), hmm_task.HMM_BOS), x0], 1).astype(np.int32)
  maskable = np.ones_like(x0, bool)
  maskable[:, 0] = False
  t_grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
  fh, fl = heavy.method.logits_fn(heavy.params), light.method.logits_fn(light.params)
  mask_id = heavy.tokenizer.mask_id
  with parallel.sharding_context(heavy.mesh):
    curves = si.time_curves(fh, fl, x0, t_grid, jax.random.key(7), mask_id, maskable)
    xi = np.where(maskable[:args.hmm_traj_runs], mask_id, x0[:args.hmm_traj_runs])
    traj = si.trajectory_kl(fh, fl, jax.random.key(11), xi, maskable[:args.hmm_traj_runs],
                            mask_id, t_steps)
  all_h = per_seed[()]
  rows = []
  for p in placements:
    sched = ms.ModelSchedule.from_placement(p, num_seg, seg_len)
    recs = per_seed[p]
    deltas = [r["gen_nll"] - h["gen_nll"] for r, h in zip(recs, all_h)]
    paired = np.concatenate([r["nll_per_sample"] - h["nll_per_sample"] for r, h in zip(recs, all_h)])
    flops = flops_lib.flops_report(sched, fh_cfg, fl_cfg,
                                   np.array([r["nfe_heavy"] for r in recs]),
                                   np.array([r["nfe_light"] for r in recs]),
                                   nfe_all_heavy=np.array([h["nfe_heavy"] for h in all_h]))
    rows.append(dict(
        light_segments=list(p), schedule=str(sched),
        names=[k for k, v in named.items() if v == p],
        gen_nll=_mean_sd([r["gen_nll"] for r in recs])[0],
        gen_nll_seed_sd=_mean_sd([r["gen_nll"] for r in recs])[1],
        delta_vs_all_h=float(np.mean(deltas)),
        delta_se=float(paired.std(ddof=1) / np.sqrt(paired.size)) if p else 0.0,
        entropy=_mean_sd([r["entropy"] for r in recs])[0],
        nfe_heavy=_mean_sd([r["nfe_heavy"] for r in recs])[0],
        nfe_light=_mean_sd([r["nfe_light"] for r in recs])[0],
        flops_blocks=flops["blocks"]["nfe_per_sample"], flops_full=flops["full"]["nfe_per_sample"],
        saving_blocks=flops["blocks"]["saving_vs_all_heavy_nfe"],
        saving_full=flops["full"]["saving_vs_all_heavy_nfe"],
        wall_ms_per_sample=1e3 * _mean_sd([r["wall"] for r in recs[1:] or recs])[0] / n,
        pred_delta_ce=si.predicted_degradation(sched, curves["delta_ce"], t_grid),
        pred_kl=si.predicted_degradation(sched, curves["kl"], t_grid),
        pred_traj_kl=si.predicted_degradation(sched, traj)))
  by_p = {tuple(r["light_segments"]): r for r in rows}
  pairs = [by_p[p] for p in ms.enumerate_placements(num_seg, 2)]
  measured = [r["delta_vs_all_h"] for r in pairs]
  search = si.search_placements(lambda sc: by_p[tuple(
      i for i in range(num_seg) if sc.expand()[i * seg_len])]["delta_vs_all_h"],
      num_seg, seg_len, 2)
  rank_of = {tuple(r["light_segments"]): r["rank"] for r in search}
  pred_best = {}
  for key in ("pred_delta_ce", "pred_kl", "pred_traj_kl"):
    best = min(pairs, key=lambda r: r[key])
    pred_best[key] = dict(placement=best["light_segments"],
                          measured_rank=rank_of[tuple(best["light_segments"])],
                          spearman=metrics_lib.spearman(measured, [r[key] for r in pairs]))
  gap = by_p[tuple(range(num_seg))]["delta_vs_all_h"]
  claims = dict(
      spearman_delta_ce_ge_0_5=pred_best["pred_delta_ce"]["spearman"] >= 0.5,
      curve_best_in_measured_top_quartile=pred_best["pred_delta_ce"]["measured_rank"] <= 7,
      sandwich_rank=rank_of[(0, 7)], middle_rank=rank_of[(3, 4)], prefix_rank=rank_of[(0, 1)],
      suffix_rank=rank_of[(6, 7)],
      best_cost_lt_half_gap=search[0]["score"] < 0.5 * gap,
      best_entropy_within_0_01=abs(by_p[search[0]["light_segments"]]["entropy"]
                                   - by_p[()]["entropy"]) < 0.01,
      all_l_minus_all_h=gap, precondition_gap_ge_0_05=gap >= 0.05)
  best = by_p[search[0]["light_segments"]]
  return dict(rows=rows, search=search[:5], predicted_best=pred_best, claims=claims,
              best=dict(schedule=best["schedule"], delta=best["delta_vs_all_h"],
                        saving_blocks=best["saving_blocks"], saving_full=best["saving_full"],
                        rel_gen_nll_change=best["delta_vs_all_h"] / by_p[()]["gen_nll"]),
              curves=dict(t=t_grid.tolist(), ce_heavy=curves["ce_heavy"].tolist(),
                          ce_light=curves["ce_light"].tolist(),
                          delta_ce=curves["delta_ce"].tolist(), kl=curves["kl"].tolist(),
                          trajectory_kl=traj.tolist()),
              runs=dict(heavy=last_metrics(wh), light=last_metrics(wl)),
              settings=dict(samples_per_seed=n, seeds=args.seeds, T=t_steps, segments=num_seg,
                            cache=False, curve_seqs=args.hmm_curve_seqs,
                            traj_runs=args.hmm_traj_runs, heavy_steps=args.hmm_heavy_steps,
                            light_steps=args.hmm_light_steps))


# ---------------------------------------------------------------------------------------------
# Part T: tiny text corpus, gen-PPL by the repository's AR judge
# ---------------------------------------------------------------------------------------------
TEXT_SCHEDULES = (("all-H", "H64"), ("all-L", "L64"), ("sandwich 25%", "L8,H48,L8"),
                  ("prefix 25%", "L16,H48"), ("suffix 25%", "H48,L16"),
                  ("middle 25%", "H24,L16,H24"))


def _verse_prompts(tok, seed: int, n: int, plen: int) -> np.ndarray:
  from dlm_jax.data import corpora as sources  # pylint: disable=g-import-not-at-top
  src = sources.BibleSource("validation")
  verses = [ln for i in range(len(src)) for ln in src[i].split("\n")[1:] if len(ln) > 40]
  rng = np.random.default_rng([0x7E47, seed])
  idx = rng.choice(len(verses), n, replace=False)
  rows = [[tok.bos_id] + list(tok.encode(verses[i]))[:plen - 1] for i in idx]
  return np.asarray(rows, np.int32)


def part_text(args, log) -> dict:
  extra = tuple(args.text_train_flags.split())
  wh = ensure_run(args.root, "text_heavy", "configs/mdlm_tiny.py", args.text_train_steps, log,
                  extra)
  wl = ensure_run(args.root, "text_light", "configs/mdlm_tiny_light.py", args.text_train_steps,
                  log, extra)
  wj = ensure_run(args.root, "text_ar", "configs/ar_tiny.py", args.text_train_steps, log, extra)
  heavy, light, judge = api.load(wh), api.load(wl), api.load(wj)
  scheduled.check_pair_configs(heavy.config, light.config)
  scheduled.check_pair_tokenizers(heavy.tokenizer, light.tokenizer)
  tok = heavy.tokenizer
  n, g = args.text_samples, args.text_gen_len
  t_steps = 64
  sampler = scheduled.ScheduledSampler(heavy.method, light.method)
  s = _sample_cfg(heavy, batch_size=n, num_samples=n, gen_len=g, t_final=0.0, use_cache=True,
                  decoder="ancestral", num_steps=t_steps)
  fh_cfg = flops_lib.flops_model_config(heavy.config, tok.vocab_size, g + 1)
  fl_cfg = flops_lib.flops_model_config(light.config, tok.vocab_size, g + 1)
  sched_rows: dict[str, list] = {k: [] for k, _ in TEXT_SCHEDULES}
  for seed in args.seeds:
    for name, spec in TEXT_SCHEDULES:
      sched = ms.parse_schedule(spec, t_steps)
      with parallel.sharding_context(heavy.mesh):
        if seed == args.seeds[0] and name == "all-H":
          sampler.sample(heavy.params, light.params, jax.random.key(99), s, sched)
        t0 = time.perf_counter()
        out = jax.device_get(sampler.sample(heavy.params, light.params, jax.random.key(seed), s,
                                            sched))
        wall = time.perf_counter() - t0
      gen = np.asarray(out["tokens"])[:, 1:]
      texts = [tok.decode(list(r)) for r in gen]
      gp = gen_ppl_lib.gen_ppl(judge, texts, token_ids=[list(r) for r in gen])
      sched_rows[name].append(dict(gen_ppl=gp["gen_ppl"], entropy=gp["unigram_entropy"],
                                   nfe_heavy=float(np.mean(out["nfe_heavy"])),
                                   nfe_light=float(np.mean(out["nfe_light"])),
                                   wall_ms_per_sample=1e3 * wall / n, sample=texts[0][:160]))
      print(f"text seed {seed} {name:13s} gen-PPL {gp['gen_ppl']:.1f} ent "
            f"{gp['unigram_entropy']:.2f} nfe H {np.mean(out['nfe_heavy']):.1f} L "
            f"{np.mean(out['nfe_light']):.1f}", flush=True)
  sched_table = []
  all_h = sched_rows["all-H"]
  for name, spec in TEXT_SCHEDULES:
    recs = sched_rows[name]
    sched = ms.parse_schedule(spec, t_steps)
    flops = flops_lib.flops_report(sched, fh_cfg, fl_cfg, np.array([r["nfe_heavy"] for r in recs]),
                                   np.array([r["nfe_light"] for r in recs]),
                                   nfe_all_heavy=np.array([h["nfe_heavy"] for h in all_h]))
    ppl = [r["gen_ppl"] for r in recs]
    rel = [r["gen_ppl"] / h["gen_ppl"] - 1 for r, h in zip(recs, all_h)]
    sched_table.append(dict(
        schedule=name, spec=spec, gen_ppl=_mean_sd(ppl)[0], gen_ppl_seed_sd=_mean_sd(ppl)[1],
        rel_gen_ppl_vs_all_h=float(np.mean(rel)),
        entropy=_mean_sd([r["entropy"] for r in recs])[0],
        nfe_heavy=_mean_sd([r["nfe_heavy"] for r in recs])[0],
        nfe_light=_mean_sd([r["nfe_light"] for r in recs])[0],
        flops_blocks=flops["blocks"]["nfe_per_sample"], flops_full=flops["full"]["nfe_per_sample"],
        saving_blocks=flops["blocks"]["saving_vs_all_heavy_nfe"],
        saving_full=flops["full"]["saving_vs_all_heavy_nfe"],
        saving_blocks_nominal=flops["blocks"]["saving_nominal"],
        wall_ms_per_sample=_mean_sd([r["wall_ms_per_sample"] for r in recs])[0],
        example=recs[0]["sample"]))
  # Decoders on prefix prompts (greedy).
  dec_rows: dict[str, list] = {}
  plen, dg, block = 8, args.text_gen_len, 16
  fpp = _flops_per_pass(heavy, plen + dg)
  for seed in args.seeds:
    prompts = _verse_prompts(tok, seed, n, plen)
    for name, opts in DECODERS:
      if name in FRONTIER and not args.text_frontier:
        continue
      out = run_decoder(heavy, prompts, dg, block, opts, jax.random.key(seed),
                        warm=seed == args.seeds[0])
      full = np.asarray(out["tokens"])
      texts = [tok.decode(list(r)) for r in full[:, 1:]]
      gp = gen_ppl_lib.gen_ppl(judge, texts, token_ids=[list(r[plen:]) for r in full])
      nfe = np.asarray(out["nfe"], np.float64)
      dec_rows.setdefault(name, []).append(dict(
          gen_ppl=gp["gen_ppl"], entropy=gp["unigram_entropy"], mean_nfe=float(nfe.mean()),
          tpf_gen=dg * len(nfe) / nfe.sum(), flops_per_sample=float(nfe.mean() * fpp),
          wall_ms_per_sample=1e3 * out["wall_sec"] / len(nfe), commits=_commit_counts(out)))
      print(f"text-dec seed {seed} {name:16s} gen-PPL {gp['gen_ppl']:.1f} nfe {nfe.mean():.1f}",
            flush=True)
  dec_table = []
  for name, recs in dec_rows.items():
    dec_table.append(dict(
        decoder=name, gen_ppl=_mean_sd([r["gen_ppl"] for r in recs])[0],
        gen_ppl_seed_sd=_mean_sd([r["gen_ppl"] for r in recs])[1],
        entropy=_mean_sd([r["entropy"] for r in recs])[0],
        mean_nfe=_mean_sd([r["mean_nfe"] for r in recs])[0],
        tpf_gen=_mean_sd([r["tpf_gen"] for r in recs])[0],
        flops_per_sample=_mean_sd([r["flops_per_sample"] for r in recs])[0],
        wall_ms_per_sample=_mean_sd([r["wall_ms_per_sample"] for r in recs])[0],
        commits={c: sum(r["commits"][c] for r in recs) for c in RULES}))
  by = {r["schedule"]: r for r in sched_table}
  ok = [r for r in sched_table if r["schedule"] not in ("all-H", "all-L")]
  best = min(ok, key=lambda r: r["rel_gen_ppl_vs_all_h"])
  headline = dict(best_schedule=best["schedule"], saving_blocks=best["saving_blocks"],
                  saving_full=best["saving_full"], rel_gen_ppl=best["rel_gen_ppl_vs_all_h"],
                  target_met=bool(best["saving_blocks"] >= 0.17
                                  and best["rel_gen_ppl_vs_all_h"] <= 0.02),
                  all_l_rel_gen_ppl=by["all-L"]["rel_gen_ppl_vs_all_h"])
  return dict(schedules=sched_table, decoders=dec_table, headline=headline,
              runs=dict(heavy=last_metrics(wh), light=last_metrics(wl), judge=last_metrics(wj)),
              settings=dict(samples_per_seed=n, seeds=args.seeds, T=t_steps, gen_len=g,
                            cache=True, decoder_block=block, prompt_len=plen,
                            train_steps=args.text_train_steps,
                            train_flags=args.text_train_flags))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _fmt_flops(x: float) -> str:
  return f"{x / 1e6:.1f}M" if x < 1e9 else f"{x / 1e9:.2f}G"


def write_markdown(res: dict, path: str) -> None:
  L = ["# Fast decoding benchmark (benchmarks/decoding.py)", ""]
  runs = []
  for k, v in res["train_log"].items():
    how = "reused" if v["reused"] else "trained %d steps in %.0fs" % (v["steps"], v["train_sec"])
    runs.append(f"{k} ({how})")
  L.append(f"Wall time (sum of the runs): {res['total_sec'] / 60:.1f} min on "
           f"{res['env']['device']} ({res['env']['cpu_count']} cores). Checkpoints: "
           + ", ".join(runs) + ".")
  L.append("")
  if "arith" in res:
    a = res["arith"]
    st = a["settings"]
    L += ["## ARITH-CHAIN: R²-dLLM rules on threshold decoding", "",
          f"{st['prompts_per_seed']} held-out prompts x {len(st['seeds'])} seeds (disjoint prompt "
          f"sets), greedy, {st['gen_len']} slots in blocks of {st['block_len']}; base student "
          f"trained {st['train_steps']} steps. Accuracy pooled over seeds with 95% Wilson interval; "
          "FLOPs = full-convention forward FLOPs x mean NFE.", "",
          "| decoder | accuracy (95% CI) | valid | mean NFE | TPF_gen | TPF_content | FLOPs/sample "
          "| wall ms/sample | NFE vs 1 tok | commits thr/conf/token/temporal |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in a["table"]:
      c = r["commits"]
      L.append(f"| {r['decoder']} | {100 * r['accuracy']:.1f} ({100 * r['acc_lo']:.1f}-"
               f"{100 * r['acc_hi']:.1f}) | {100 * r['valid_rate']:.1f} | {r['mean_nfe']:.2f} "
               f"± {r['nfe_seed_sd']:.2f} | {r['tpf_gen']:.2f} | {r['tpf_content']:.2f} | "
               f"{_fmt_flops(r['flops_per_sample'])} | {r['wall_ms_per_sample']:.2f} | "
               f"{-100 * r['nfe_reduction_vs_1tok']:+.1f}% | {c['threshold']}/{c['conf_cluster']}/"
               f"{c['token_cluster']}/{c['temporal']} |")
    h = a["headline"]
    L += ["", f"All rules vs one token per pass: {100 * h['nfe_reduction_all_rules_vs_1tok']:.1f}% "
          f"fewer forwards at {h['acc_change_points_all_rules_vs_1tok']:+.1f} accuracy points "
          f"(target >= 80% at >= -1 point: {'met' if h['target_met'] else 'NOT met'}). "
          f"vs tau = 0.9 alone: {100 * h['nfe_reduction_all_rules_vs_tau09']:.1f}% fewer. vs the "
          f"plain-threshold frontier at the same accuracy (NFE "
          f"{h['threshold_frontier_nfe_at_all_rules_accuracy']:.2f}): "
          f"{100 * h['nfe_reduction_all_rules_vs_frontier']:+.1f}%. Largest reduction within "
          f"1 point: {h['best_within_1pt']['decoder']} "
          f"({100 * h['best_within_1pt']['nfe_reduction']:.1f}%; target "
          f"{'met' if h['best_within_1pt'].get('target_met') else 'NOT met'}).", ""]
  if "hmm" in res:
    hm = res["hmm"]
    st = hm["settings"]
    L += ["## HMM-16 (toy S): heavy/light model scheduling", "",
          f"T = {st['T']} ancestral steps, {st['segments']} segments of 4, cache off, common random "
          f"numbers, BOS/PAD never drawn, {st['samples_per_seed']} samples x {len(st['seeds'])} seeds per schedule; H "
          f"trained {st['heavy_steps']} steps, L {st['light_steps']}. gen-NLL in nats/token under "
          "the smoothed evaluator (data: 1.7745); Delta = paired difference to all-H (± s.e.); "
          "saving = 1 - FLOPs/FLOPs(all-H) over the passes run.", "",
          "| schedule | names | gen-NLL | Delta vs all-H | entropy | NFE H/L | FLOPs blocks / full "
          "| saving blocks / full | pred. Delta_CE | wall ms/sample |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(hm["rows"], key=lambda r: (len(r["light_segments"]) not in (0, 8),
                                             len(r["light_segments"]), r["delta_vs_all_h"]))
    for r in rows:
      L.append(f"| {r['schedule']} | {', '.join(r['names'])} | {r['gen_nll']:.4f} | "
               f"{r['delta_vs_all_h']:+.4f} ± {r['delta_se']:.4f} | {r['entropy']:.3f} | "
               f"{r['nfe_heavy']:.0f}/{r['nfe_light']:.0f} | {_fmt_flops(r['flops_blocks'])} / "
               f"{_fmt_flops(r['flops_full'])} | {100 * r['saving_blocks']:.1f}% / "
               f"{100 * r['saving_full']:.1f}% | {r['pred_delta_ce']:.3f} | "
               f"{r['wall_ms_per_sample']:.2f} |")
    c, pb = hm["claims"], hm["predicted_best"]
    L += ["", "Step importance over the 28 two-segment placements: "
          + "; ".join(f"{k}: Spearman {v['spearman']:+.2f}, its best {tuple(v['placement'])} ranks "
                      f"{v['measured_rank']}/28" for k, v in pb.items())
          + f". Search best: {hm['best']['schedule']} (Delta {hm['best']['delta']:+.4f}, "
          f"{100 * hm['best']['rel_gen_nll_change']:+.2f}% gen-NLL, saving "
          f"{100 * hm['best']['saving_blocks']:.1f}% blocks / {100 * hm['best']['saving_full']:.1f}% "
          f"full). Ranks (of 28): sandwich (0,7) {c['sandwich_rank']}, middle (3,4) "
          f"{c['middle_rank']}, prefix (0,1) {c['prefix_rank']}, suffix (6,7) {c['suffix_rank']}. "
          f"all-L - all-H = {c['all_l_minus_all_h']:+.4f} (precondition >= 0.05: "
          f"{c['precondition_gap_ge_0_05']}); best < half that gap: {c['best_cost_lt_half_gap']}; "
          f"entropy within 0.01: {c['best_entropy_within_0_01']}.", ""]
  if "text" in res:
    tx = res["text"]
    st = tx["settings"]
    L += ["## Tiny text corpus: gen-PPL by the repository's AR judge", "",
          f"Schedules: ancestral T = {st['T']}, {st['gen_len']} generated tokens, cache on (FLOPs "
          f"over the passes run), {st['samples_per_seed']} samples x {len(st['seeds'])} seeds; "
          f"models trained {st['train_steps']} steps each ({st['train_flags']}).", "",
          "| schedule | gen-PPL (seed sd) | vs all-H | entropy | NFE H/L | FLOPs blocks / full | "
          "saving blocks / full (nominal blocks) | wall ms/sample |", "|---|---|---|---|---|---|---|---|"]
    for r in tx["schedules"]:
      L.append(f"| {r['schedule']} ({r['spec']}) | {r['gen_ppl']:.1f} ({r['gen_ppl_seed_sd']:.1f}) | "
               f"{100 * r['rel_gen_ppl_vs_all_h']:+.1f}% | {r['entropy']:.2f} | "
               f"{r['nfe_heavy']:.1f}/{r['nfe_light']:.1f} | {_fmt_flops(r['flops_blocks'])} / "
               f"{_fmt_flops(r['flops_full'])} | {100 * r['saving_blocks']:.1f}% / "
               f"{100 * r['saving_full']:.1f}% ({100 * r['saving_blocks_nominal']:.1f}%) | "
               f"{r['wall_ms_per_sample']:.1f} |")
    h = tx["headline"]
    L += ["", f"Best 25%-light schedule: {h['best_schedule']}, saving "
          f"{100 * h['saving_blocks']:.1f}% (blocks) / {100 * h['saving_full']:.1f}% (full) FLOPs at "
          f"{100 * h['rel_gen_ppl']:+.1f}% gen-PPL (target >= 17% at <= +2%: "
          f"{'met' if h['target_met'] else 'NOT met'}; all-L: {100 * h['all_l_rel_gen_ppl']:+.1f}%).",
          "", f"Decoders on {st['prompt_len']}-token prefixes of held-out verses (greedy, blocks of "
          f"{st['decoder_block']}); gen-PPL of prompt + continuation, entropy of the continuation:", "",
          "| decoder | gen-PPL | entropy | mean NFE | TPF_gen | FLOPs/sample | wall ms/sample | "
          "commits thr/conf/token/temporal |", "|---|---|---|---|---|---|---|---|"]
    for r in tx["decoders"]:
      c = r["commits"]
      L.append(f"| {r['decoder']} | {r['gen_ppl']:.1f} ({r['gen_ppl_seed_sd']:.1f}) | "
               f"{r['entropy']:.2f} | {r['mean_nfe']:.1f} | {r['tpf_gen']:.2f} | "
               f"{_fmt_flops(r['flops_per_sample'])} | {r['wall_ms_per_sample']:.1f} | "
               f"{c['threshold']}/{c['conf_cluster']}/{c['token_cluster']}/{c['temporal']} |")
    L.append("")
  L += ["Plots: " + ", ".join(f"`{p}`" for p in res.get("plots", [])), ""]
  with open(path, "w") as f:
    f.write("\n".join(L))


def make_plots(res: dict, out: str) -> list[str]:
  plt = metrics_lib.pyplot()  # names the [plots] extra when matplotlib is missing
  paths = []

  def save(fig, name):
    paths.append(os.path.join(out, name))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

  if "arith" in res:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in res["arith"]["table"]:
      ax.errorbar(r["mean_nfe"], 100 * r["accuracy"],
                  yerr=[[100 * (r["accuracy"] - r["acc_lo"])], [100 * (r["acc_hi"] - r["accuracy"])]],
                  fmt="o", capsize=3, label=r["decoder"])
    fr = sorted((r for r in res["arith"]["table"] if r["decoder"].startswith("threshold")),
                key=lambda r: r["mean_nfe"])
    ax.plot([r["mean_nfe"] for r in fr], [100 * r["accuracy"] for r in fr], "k--", lw=0.8)
    ax.set_xlabel("mean NFE per sample")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title("ARITH-CHAIN: accuracy vs forwards")
    ax.legend(fontsize=7)
    save(fig, "decoding_arith.png")
  if "hmm" in res:
    hm = res["hmm"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for r in hm["rows"]:
      k = len(r["light_segments"])
      ax.scatter(100 * r["saving_blocks"], r["delta_vs_all_h"], s=14,
                 c=f"C{k}", label=f"{k} light seg." if r is next(
                     x for x in hm["rows"] if len(x["light_segments"]) == k) else None)
      if k == 2 and tuple(r["light_segments"]) in ((0, 7), (3, 4), (0, 1), (6, 7)):
        ax.annotate(str(tuple(r["light_segments"])), (100 * r["saving_blocks"], r["delta_vs_all_h"]),
                    fontsize=7)
    ax.set_xlabel("FLOPs saving vs all-H (%, blocks)")
    ax.set_ylabel("gen-NLL - all-H (nats/token)")
    ax.set_title("HMM-16 schedules")
    ax.legend(fontsize=7)
    ax = axes[1]
    cv = hm["curves"]
    ax.plot(cv["t"], cv["delta_ce"], "o-", label="Delta_CE(t) = CE_L - CE_H")
    ax.plot(cv["t"], cv["kl"], "s-", label="KL(p_H || p_L)(t)")
    t_mid = si.step_midpoints(len(cv["trajectory_kl"]))
    ax.plot(t_mid, cv["trajectory_kl"], "^-", ms=3, label="trajectory KL (step midpoints)")
    ax.set_xlabel("t (1 = noisy start)")
    ax.set_ylabel("nats")
    ax.set_title("Step importance")
    ax.legend(fontsize=7)
    save(fig, "decoding_hmm.png")
  if "text" in res:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for r in res["text"]["schedules"]:
      ax.errorbar(r["flops_blocks"] / 1e9, r["gen_ppl"], yerr=r["gen_ppl_seed_sd"], fmt="o",
                  capsize=3, label=r["schedule"])
    ax.set_xlabel("GFLOPs per sample (blocks, passes run)")
    ax.set_ylabel("gen-PPL (AR judge)")
    ax.set_title("Tiny text: schedules")
    ax.legend(fontsize=7)
    ax = axes[1]
    for r in res["text"]["decoders"]:
      ax.errorbar(r["mean_nfe"], r["gen_ppl"], yerr=r["gen_ppl_seed_sd"], fmt="o", capsize=3,
                  label=r["decoder"])
    ax.set_xlabel("mean NFE per sample")
    ax.set_ylabel("gen-PPL (AR judge)")
    ax.set_title("Tiny text: decoders (prefix prompts)")
    ax.legend(fontsize=7)
    save(fig, "decoding_text.png")
  return paths


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  return x


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--root", default="/tmp/dlm_bench_decoding", help="checkpoint folder")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  p.add_argument("--parts", default="arith,hmm,text")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--arith_steps", type=int, default=3000)
  p.add_argument("--arith_workdir", default="",
                 help="decode this trained ARITH-CHAIN student instead of training one under --root "
                      "(e.g. workdirs/trims_toy/pretrain)")
  p.add_argument("--arith_prompts", type=int, default=1000, help="held-out prompts per seed")
  p.add_argument("--hmm_heavy_steps", type=int, default=3000)
  p.add_argument("--hmm_light_steps", type=int, default=1000)
  p.add_argument("--hmm_samples", type=int, default=96, help="samples per seed and schedule")
  p.add_argument("--hmm_curve_seqs", type=int, default=512)
  p.add_argument("--hmm_traj_runs", type=int, default=128)
  p.add_argument("--text_train_steps", type=int, default=800)
  p.add_argument("--text_train_flags", default="--config.data.seq_len=64 "
                 "--config.train.global_batch_size=16 --config.optim.warmup_steps=50",
                 help="extra training flags of the three text runs (CPU budget)")
  p.add_argument("--text_samples", type=int, default=32, help="samples per seed")
  p.add_argument("--text_gen_len", type=int, default=48)
  p.add_argument("--text_frontier", action=argparse.BooleanOptionalAction, default=True,
                 help="also run the low-threshold decoders (" + ", ".join(FRONTIER) + ") on text")
  p.add_argument("--tag", default="decoding")
  p.add_argument("--merge", default="",
                 help="comma list of result tags (JSON in --out) from runs of single --parts to "
                      "merge into --tag's markdown, JSON and plots; runs nothing")
  args = p.parse_args()
  args.seeds = [int(s) for s in args.seeds.split(",")]
  jax.config.update("jax_enable_x64", True)
  os.makedirs(args.out, exist_ok=True)
  if args.merge:
    res = dict(train_log={}, total_sec=0.0, runs_merged=[])
    for tag in args.merge.split(","):
      part = json.load(open(os.path.join(args.out, f"{tag}.json")))
      res["env"] = part["env"]
      res["train_log"].update(part["train_log"])
      res["total_sec"] += part["total_sec"]
      res["runs_merged"].extend(part.get("runs_merged") or [  # a merged file lists its runs
          dict(tag=tag, args=part["args"], total_sec=part["total_sec"])])
      for k in ("arith", "hmm", "text"):
        if k in part:
          res[k] = part[k]
    res["plots"] = [os.path.relpath(x, ROOT) for x in make_plots(res, args.out)]
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
      json.dump(_jsonable(res), f, indent=1)
    write_markdown(res, os.path.join(args.out, f"{args.tag}.md"))
    print(open(os.path.join(args.out, f"{args.tag}.md")).read())
    return
  t0 = time.perf_counter()
  log: dict = {}
  res: dict = dict(env=dict(device=str(jax.devices()[0].platform), cpu_count=os.cpu_count(),
                            jax=jax.__version__), args=vars(args), train_log=log)
  parts = args.parts.split(",")
  for part, fn in (("arith", part_arith), ("hmm", part_hmm), ("text", part_text)):
    if part in parts:
      ts = time.perf_counter()
      res[part] = fn(args, log)
      res[part]["part_sec"] = time.perf_counter() - ts
      print(f"== {part} done in {res[part]['part_sec']:.0f}s", flush=True)
  res["total_sec"] = time.perf_counter() - t0
  res["plots"] = [os.path.relpath(x, ROOT) for x in make_plots(res, args.out)]
  with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
    json.dump(_jsonable(res), f, indent=1)
  write_markdown(res, os.path.join(args.out, f"{args.tag}.md"))
  print(open(os.path.join(args.out, f"{args.tag}.md")).read())


if __name__ == "__main__":
  main()
