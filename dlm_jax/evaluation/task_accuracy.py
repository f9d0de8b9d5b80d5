"""Task accuracy vs tokens per forward (TPF) under threshold decoding (spec/trims.md, mdlm.md).

For a masked-diffusion run on ARITH-CHAIN: decode held-out prompts block-wise with one token per
pass (fixed-k, `steps = gen_len`) and with the Fast-dLLM threshold rule at each tau; per setting
report exact-match accuracy with a 95% Wilson interval, the valid-trace rate, TPF_gen (all
generated slots / NFE), TPF_content (slots before the first EOS / NFE), mean NFE, the histogram
of tokens committed per pass and, given a causal teacher, the reveal-rank correlation
(Spearman of commit pass vs teacher-NLL bucket of the generated response; > 0 = hard first).
AUP (accuracy under parallelism, d3LLM definition) summarises each curve.

Decoders are jitted once per (architecture, setting) and shared by every run with the same
architecture, so evaluating several fine-tuned arms compiles each setting once.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax import metrics as metrics_lib
from dlm_jax import parallel
from dlm_jax import paths
from dlm_jax.data.tasks import arith as tasks
from dlm_jax.sampling import blockwise
from dlm_jax.trims import buckets as trims_buckets
from dlm_jax.trims import metrics as trims_metrics
from dlm_jax.trims import scoring as trims_scoring

DEFAULT_TAUS = (0.9, 0.7, 0.5, 0.3)
ONE_TOKEN = "1tok"

_DECODERS: dict[tuple, Callable] = {}
_SCORERS: dict[tuple, Callable] = {}


def setting_name(tau: Optional[float]) -> str:
  """'1tok' for one token per pass, else 'tau=0.9'."""
  return ONE_TOKEN if tau is None else f"tau={tau:g}"


def _decoder(method: Any, tau: Optional[float], gen_len: int, block_len: int) -> Callable:
  """jit(params, prompt [B, P]) -> (tokens [B, P+G], nfe [B], commit_step [B, G]), cached."""
  key = (type(method).__name__, method.model_cfg, method.ids, tau, gen_len, block_len)
  if key not in _DECODERS:
    mask_id = method.ids.mask

    def fn(params, prompt):
      logits_fn = method.logits_fn(params)
      if tau is None:
        res = blockwise.decode_fixed_k(logits_fn, prompt, gen_len, block_len, gen_len, mask_id=mask_id)
      else:
        res = blockwise.decode_threshold(logits_fn, prompt, gen_len, block_len, tau=tau, mask_id=mask_id)
      return res.tokens, res.nfe, res.commit_step

    _DECODERS[key] = jax.jit(fn)
  return _DECODERS[key]


def decode(run: Any, prompts: np.ndarray, tau: Optional[float], gen_len: int, block_len: int,
           batch_size: int = 500) -> dict[str, np.ndarray]:
  """Decodes every prompt [N, P] of a loaded diffusion run; returns numpy
  {generated [N, G], nfe [N], commit_step [N, G]} (the last batch is padded, then trimmed)."""
  fn = _decoder(run.method, tau, gen_len, block_len)
  n, p = prompts.shape
  bs = min(batch_size, n)
  gens, nfes, steps = [], [], []
  with parallel.sharding_context(run.mesh):
    for lo in range(0, n, bs):
      chunk = prompts[lo:lo + bs]
      m = chunk.shape[0]
      if m < bs:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - m, axis=0)])
      tok, nfe, cs = jax.device_get(fn(run.params, jnp.asarray(chunk, jnp.int32)))
      gens.append(np.asarray(tok)[:m, p:])
      nfes.append(np.asarray(nfe)[:m])
      steps.append(np.asarray(cs)[:m])
  return dict(generated=np.concatenate(gens), nfe=np.concatenate(nfes), commit_step=np.concatenate(steps))


def teacher_buckets(teacher: Any, prompts: np.ndarray, generated: np.ndarray, num_buckets: int = 8,
                    batch_size: int = 500) -> np.ndarray:
  """Hard-first buckets [N, G] of generated responses from the teacher's NLL under teacher forcing."""
  key = (teacher.method.model_cfg, teacher.method.ids, prompts.shape[1], generated.shape[1])
  if key not in _SCORERS:
    method = teacher.method
    _SCORERS[key] = jax.jit(
        lambda params, p, r: trims_scoring.teacher_response_scores(method.logits_fn(params), p, r, "nll"))
  fn = _SCORERS[key]
  out = []
  n = prompts.shape[0]
  with parallel.sharding_context(teacher.mesh):
    for lo in range(0, n, batch_size):
      p, r = prompts[lo:lo + batch_size], generated[lo:lo + batch_size]
      m = p.shape[0]
      if m < batch_size and n > batch_size:
        p = np.concatenate([p, np.repeat(p[-1:], batch_size - m, 0)])
        r = np.concatenate([r, np.repeat(r[-1:], batch_size - m, 0)])
      out.append(np.asarray(jax.device_get(fn(teacher.params, jnp.asarray(p), jnp.asarray(r))))[:m])
  nll = np.concatenate(out)
  return trims_buckets.assign_buckets(nll, np.ones(nll.shape, bool), K=num_buckets, order="hard_first")


def score_point(task: tasks.ArithChain, prompts: np.ndarray, answers: np.ndarray, dec: dict[str, np.ndarray],
                eos_id: int) -> dict[str, Any]:
  """Metrics of one decode setting (see module docstring)."""
  gen, nfe = dec["generated"], dec["nfe"]
  n, g = gen.shape
  r = task.response_len
  if g < r:  # the undecoded tail of the response is EOS fill
    full = np.concatenate([gen, np.full((n, r - g), eos_id, gen.dtype)], axis=1)
  else:
    full = gen[:, :r]
  correct = tasks.exact_match(full, answers)
  k = int(correct.sum())
  lo, hi = metrics_lib.wilson_interval(k, n)
  valid = task.valid_traces(prompts, full)
  content = metrics_lib.content_length(gen, eos_id)
  cs = dec["commit_step"]
  per_pass = np.bincount(cs[cs >= 0].ravel(), minlength=int(nfe.max()) if n else 0)
  return dict(
      n=n, correct=k, accuracy=100.0 * k / n, acc_ci95=[100.0 * lo, 100.0 * hi],
      valid_trace_rate=100.0 * float(valid.mean()),
      tpf_gen=metrics_lib.tokens_per_forward(np.full(n, g), nfe),
      tpf_content=metrics_lib.tokens_per_forward(content, nfe),
      nfe_mean=float(nfe.mean()), content_len_mean=float(content.mean()),
      commits_per_pass=[float(x) / n for x in per_pass])


def evaluate_run(run: Any, *, taus: Sequence[float] = DEFAULT_TAUS, one_token: bool = True, n: int = 2000,
                 seed: int = 123, teacher: Any = None, num_buckets: int = 8, gen_len: Optional[int] = None,
                 block_len: Optional[int] = None, batch_size: int = 500) -> dict[str, Any]:
  """Accuracy vs TPF of one ARITH-CHAIN diffusion run over decode settings.

  Args:
    run: `dlm_jax.load` result of an 'mdlm' run with config.data.source == 'arith'.
    taus: thresholds of the threshold decoder.
    one_token: also decode with one token per pass (the 1.00-TPF_gen reference point).
    n: held-out prompts, `ArithChain.generate(seed, n)` (seed 123 by default; the SFT set uses 11).
    seed: test-set seed.
    teacher: optional loaded causal run for the reveal-rank correlation.
    num_buckets: K of the reveal-rank buckets.
    gen_len: generated slots (default config.sample.gen_len, else response length rounded to blocks).
    block_len: block length (default config.sample.block_len).
    batch_size: prompts per decode call.

  Returns:
    {"points": [one dict per setting: setting, tau, accuracy, acc_ci95, valid_trace_rate, tpf_gen,
     tpf_content, nfe_mean, commits_per_pass, reveal_rank_corr], "n", "seed", "gen_len", "block_len",
     "workdir", "step"}.
  """
  cfg = run.config
  if cfg.data.source != "arith":
    raise ValueError(f"--task_accuracy needs an ARITH-CHAIN run (config.data.source='arith'), got "
                     f"{cfg.data.source!r}.")
  if not hasattr(run.method, "logits_fn") or cfg.method != "mdlm":
    raise ValueError(f"--task_accuracy decodes masked-diffusion runs (method 'mdlm'), got {cfg.method!r}.")
  task = tasks.ArithChain()
  block_len = int(block_len or cfg.sample.block_len)
  gen_len = int(gen_len or cfg.sample.gen_len or (task.response_len // block_len) * block_len)
  if gen_len % block_len:
    raise ValueError(f"gen_len={gen_len} must be a multiple of block_len={block_len}.")
  if task.prompt_len + gen_len > run.method.model_cfg.max_len:
    raise ValueError(f"prompt {task.prompt_len} + gen_len {gen_len} exceeds model.max_len.")
  ex = task.generate(seed, n)
  prompts, answers = ex["prompt"], ex["answer"]
  settings: list[Optional[float]] = ([None] if one_token else []) + [float(t) for t in taus]
  points = []
  for tau in settings:
    dec = decode(run, prompts, tau, gen_len, block_len, batch_size)
    pt = dict(setting=setting_name(tau), tau=tau,
              **score_point(task, prompts, answers, dec, run.tokenizer.eos_id))
    if teacher is not None:
      b = teacher_buckets(teacher, prompts, dec["generated"], num_buckets, batch_size)
      pt["reveal_rank_corr"] = trims_metrics.reveal_rank_correlation(dec["commit_step"], b)
    points.append(pt)
  return dict(points=points, n=n, seed=seed, gen_len=gen_len, block_len=block_len,
              workdir=getattr(run, "workdir", ""), step=int(getattr(run, "step", -1)))


def aup_of(points: Sequence[dict[str, Any]], y_max: float, tpf_key: str = "tpf_gen") -> float:
  """AUP of one curve (accuracy in percent) with `y_max` the best accuracy of any method."""
  return trims_metrics.aup([p[tpf_key] for p in points], [p["accuracy"] for p in points], y_max)


def plot_curves(curves: dict[str, Sequence[dict[str, Any]]], path: str, tpf_key: str = "tpf_content",
                title: str = "ARITH-CHAIN: accuracy vs tokens per forward",
                errors: Optional[dict[str, tuple[Sequence[float], Sequence[float]]]] = None) -> str:
  """Writes a PNG of accuracy (%) vs `tpf_key`, one line per label; returns the path.

  Args:
    curves: label -> points (dicts with `tpf_key`, 'accuracy' and 'setting').
    path: output .png.
    tpf_key: 'tpf_content' or 'tpf_gen'.
    title: plot title.
    errors: optional label -> (x_err, y_err) per point (e.g. std over seeds).
  """
  plt = metrics_lib.pyplot()  # MissingExtraError without the [plots] extra
  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
  for label, pts in curves.items():
    pts = sorted(pts, key=lambda p: p[tpf_key])
    x = [p[tpf_key] for p in pts]
    y = [p["accuracy"] for p in pts]
    if errors and label in errors:
      xe, ye = errors[label]
      order = np.argsort([p[tpf_key] for p in curves[label]])
      ax.errorbar(x, y, xerr=np.asarray(xe)[order], yerr=np.asarray(ye)[order], marker="o", capsize=2,
                  label=label)
    else:
      ax.plot(x, y, marker="o", label=label)
  ax.set_xlabel({"tpf_content": "TPF_content (content tokens / forward)",
                 "tpf_gen": "TPF_gen (generated slots / forward)"}.get(tpf_key, tpf_key))
  ax.set_ylabel("exact-match accuracy (%)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  paths.write_bytes(path, buf.getvalue())  # a local path or gs://
  return path
