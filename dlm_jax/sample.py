r"""Sampling entry point: checkpoint -> samples (text), with any decoder.

  python -m dlm_jax.sample --workdir=/tmp/run --config.sample.decoder=threshold \
      --config.sample.tau=0.9 --config.sample.r2=conf,token,stability --num_samples=8

Any config.sample field can be overridden as in train (`--config.sample.<field>=value`, typed by
the schema); the rest of the config is the one saved with the checkpoint. `--set key=value` is
the deprecated older form (one release). The seed is config.sample.seed (`--seed` sets it too).

Model scheduling (arXiv 2604.02340): a heavy and a light MDLM run of the same data and
tokenizer, and a schedule of contiguous segments over the ancestral steps (step 0 = noisy start):

  python -m dlm_jax.sample --workdir=HEAVY --light_workdir=LIGHT --schedule=L8,H16,L8

The schedule's length sets sample.num_steps (or must equal it when --config.sample.num_steps is
given).

Prompts and infilling (MDLM and DID runs):

  python -m dlm_jax.sample --workdir=/tmp/run --prompts=prompts.jsonl --num_samples=2
  python -m dlm_jax.sample --workdir=/tmp/run --infill="The [[6]] sat on the [[2]]."

A prompts file has one JSON object per line: {"prompt": "text"} (a prefix to continue) or
{"infill": "template"}, with an optional "id"; any other key is an error naming the line.
Template syntax: [[N]] marks a span of exactly N tokens to fill (MDLM decoders: ancestral,
threshold, fixed_k), [[*]] a gap open to insertions (DID; the number of tokens emerges, up to
sample.capacity in all), \[[ is a literal "[[". Text outside the spans is kept verbatim; spans
that run past the model's length are refused, naming the span. Each prompt or template gets
--num_samples completions (default 1), written to completions.jsonl (prompt, completion: a string
for a prompt, one string per span for a template, text, decoder, nfe, sample, id).

Decoders run their fast path (the output head only where a token is drawn);
--config.sample.reference=true runs the original loops (one prefix prompt only).

Writes samples.jsonl (one record per sample: text, tokens, NFE) and samples_summary.json
(decoder settings, NFE, tokens per forward, wall time per sample, commits per R² rule, FLOPs per
sample for schedules) into --workdir (or --out_dir) and prints the texts. Bad input (a threshold
outside (0, 1], an unknown R² rule, a schedule outside the step range, two runs with different
methods or tokenizers) stops with exit status 2 before any sampling.
"""

from __future__ import annotations

import json
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np

from dlm_jax import config as config_lib
from dlm_jax import methods
from dlm_jax import metrics as metrics_lib
from dlm_jax import paths
from dlm_jax.run import api
from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax.run import cli
from dlm_jax.run import prompts as prompts_lib
from dlm_jax.sampling import templates
from dlm_jax.sampling import decoders
from dlm_jax.scheduling import flops as flops_lib
from dlm_jax.scheduling import sampler as scheduled

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to sample from (the heavy "
                               "model when --light_workdir is given).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_NUM = flags.DEFINE_integer("num_samples", None, "Overrides config.sample.num_samples.")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed: sets config.sample.seed (default: "
                             "the run's config.sample.seed).")
_OUT = flags.DEFINE_string("out_dir", None, "Where to write samples (default: --workdir).")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "Use the raw parameters instead of the EMA.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt (prefix) for conditional sampling.")
_SET = flags.DEFINE_multi_string(
    "set", [], "Deprecated (use --config.sample.<key>=value): config.sample overrides as "
    "key=value.")
_LIGHT = flags.DEFINE_string("light_workdir", None,
                             "Workdir of the light model for model scheduling (with --schedule).")
_LIGHT_STEP = flags.DEFINE_integer("light_step", None, "Checkpoint step of the light model.")
_SCHEDULE = flags.DEFINE_string(
    "schedule", None, "Heavy/light schedule over the ancestral steps, e.g. L8,H16,L8 (light on "
    "the first and last 8 of 32 steps).")

_PROMPTS = flags.DEFINE_string(
    "prompts", None, "JSONL file of prompts, one object per line: {\"prompt\": \"...\"} (a "
    "prefix) or {\"infill\": \"template\"}, optional \"id\". Template: [[N]] = a span of N "
    "tokens to fill (MDLM), [[*]] = a gap open to insertions (DID), \\[[ = a literal [[. Writes "
    "completions.jsonl; --num_samples completions per prompt (default 1).")
_INFILL = flags.DEFINE_string(
    "infill", None, "One infilling template, e.g. 'The [[6]] sat on the [[2]].' (MDLM) or "
    "'The [[*]] sat.' (DID); see --prompts for the syntax.")

RULE_NAMES = ("threshold", "conf_cluster", "token_cluster", "temporal")


def _commit_stats(out: dict, n: int) -> dict[str, Any]:
  """Commits per rule from the decoder's commit_rule [N, G] (blockwise decoders only)."""
  if "commit_rule" not in out:
    return {}
  rules = np.asarray(out["commit_rule"])
  counts = {name: int(np.sum(rules == i)) for i, name in enumerate(RULE_NAMES)}
  return dict(commits_per_rule=counts,
              commits_per_rule_per_sample={k: v / max(n, 1) for k, v in counts.items()},
              never_committed=int(np.sum(rules < 0)))


def _write(out_dir: str, texts, tokens, nfe, summary: dict) -> None:
  """samples.jsonl and samples_summary.json into out_dir (a local folder or gs://...)."""
  records = [dict(text=t, tokens=[int(x) for x in np.asarray(tk).ravel()], nfe=float(n))
             for t, tk, n in zip(texts, tokens, nfe)]
  api.write_jsonl(paths.join(out_dir, "samples.jsonl"), records)
  paths.write_text(paths.join(out_dir, "samples_summary.json"), json.dumps(summary, indent=2))


def _check_saved_options(workdir: str, step, overrides: dict) -> None:
  """Checks the decoder options (saved sample config + overrides) before any weights load."""
  base = api.read_run_config(workdir, step)[0]
  s0 = base.sample
  for k, v in overrides.items():
    s0[k] = v
  method_cls = methods.get_method_class(base.method)
  decoders.check_options(s0, method_cls.family, method_cls.default_decoder, method_cls.name)


def run_sampling(workdir: str, overrides: dict, num_samples: int | None, seed: int | None,
                 out_dir: str | None, step: int | None = None, use_ema: bool = True,
                 prompt: str | None = None) -> dict:
  """Single-model sampling; returns dict(summary, texts) and writes the two files.

  `seed` None: config.sample.seed (after `overrides`).
  """
  _check_saved_options(workdir, step, overrides)
  run = api.load(workdir, step=step, use_ema=use_ema)
  s = run.config.sample
  for k, v in overrides.items():
    s[k] = v
  if num_samples is not None:
    s.num_samples = num_samples
    s.batch_size = min(s.batch_size, num_samples)
  if seed is not None:
    s.seed = seed
  out = api.sample_batches(run, s, seed=s.seed, prompt_text=prompt)
  n = len(out["texts"])
  nfe = np.asarray(out["nfe"], np.float64).reshape(n, -1).sum(-1)
  gen = int(out.get("gen_len", 0)) or 1
  summary = dict(step=run.step, decoder=s.decoder, num_steps=s.num_steps, tau=s.tau,
                 r2=s.r2, seed=s.seed, num_samples=n, gen_len=gen, mean_nfe=float(nfe.mean()),
                 total_nfe=float(nfe.sum()),
                 tokens_per_forward=metrics_lib.tokens_per_forward(np.full(n, gen), nfe),
                 wall_sec_per_sample=out["wall_sec"] / max(n, 1), wall_includes_compile=True)
  if "tokens" in out and "prompt_len" in out:
    gen_tok = np.asarray(out["tokens"])[:, int(out["prompt_len"]):]
    content = metrics_lib.content_length(gen_tok, run.tokenizer.eos_id)
    summary["tokens_per_forward_content"] = metrics_lib.tokens_per_forward(content, nfe)
  summary.update(_commit_stats(out, n))
  _write(out_dir or workdir, out["texts"], out["tokens"], nfe, summary)
  return dict(summary=summary, texts=out["texts"])


def run_prompts(workdir: str, overrides: dict, num_samples: int | None, seed: int | None,
                out_dir: str | None, step: int | None = None, use_ema: bool = True,
                prompts_file: str | None = None, infill: str | None = None) -> dict:
  """Completions of a prompts file and/or one template; writes completions.jsonl.

  The file and the templates are read and checked (unknown keys, bad spans) before any
  sampling; returns dict(summary, texts, records). `seed` None: config.sample.seed (after
  `overrides`).
  """
  items = []
  if prompts_file:
    items += prompts_lib.read_prompts(prompts_file)
  if infill:
    items += prompts_lib.infill_items(infill)
  _check_saved_options(workdir, step, overrides)
  for it in items:
    if it.kind == "infill":
      try:
        templates.parse_template(it.text)
      except ValueError as e:
        raise ValueError(f"{it.where}: {e}") from None
  run = api.load(workdir, step=step, use_ema=use_ema)
  s = run.config.sample
  for k, v in overrides.items():
    s[k] = v
  s.num_samples = 1 if num_samples is None else num_samples
  if seed is not None:
    s.seed = seed
  res = prompts_lib.generate(run, items, s, seed=s.seed)
  out_path = paths.join(out_dir or workdir, "completions.jsonl")
  api.write_jsonl(out_path, res["records"])
  n = len(res["records"])
  summary = dict(step=run.step, decoder=res["records"][0]["decoder"] if n else s.decoder,
                 num_prompts=len(items), num_completions=n,
                 mean_nfe=float(np.mean(res["nfe"])) if n else 0.0,
                 wall_sec_per_completion=res["wall_sec"] / max(n, 1),
                 wall_includes_compile=True, seed=s.seed, out=out_path)
  return dict(summary=summary, texts=res["texts"], records=res["records"])


def run_scheduled_sampling(workdir: str, light_workdir: str, schedule_spec: str, overrides: dict,
                           num_samples: int | None, seed: int | None, out_dir: str | None,
                           step: int | None = None, light_step: int | None = None,
                           use_ema: bool = True, prompt: str | None = None) -> dict:
  """Heavy/light scheduled ancestral sampling; returns dict(summary, texts), writes files.

  Every check (options, schedule range, methods and tokenizers of the two runs) runs before
  any sampling.
  """
  heavy_cfg = api.read_run_config(workdir, step)[0]
  light_cfg = api.read_run_config(light_workdir, light_step)[0]
  s = heavy_cfg.sample
  for k, v in overrides.items():
    s[k] = v
  scheduled.check_pair_configs(heavy_cfg, light_cfg)
  decoders.check_options(s, "masked", "ancestral", "mdlm")
  if (s.decoder or "ancestral") != "ancestral":
    raise config_lib.ConfigError(f"--schedule runs ancestral sampling; sample.decoder="
                                 f"{s.decoder!r} is not supported with two models.")
  num_steps = overrides.get("num_steps")
  schedule = scheduled.resolve_schedule(schedule_spec, num_steps)
  heavy = api.load(workdir, step=step, use_ema=use_ema)
  light = api.load(light_workdir, step=light_step, use_ema=use_ema)
  scheduled.check_pair_tokenizers(heavy.tokenizer, light.tokenizer)
  s = heavy.config.sample
  for k, v in overrides.items():
    s[k] = v
  s.decoder = "ancestral"
  s.num_steps = schedule.num_steps
  if num_samples is not None:
    s.num_samples = num_samples
    s.batch_size = min(s.batch_size, num_samples)
  tok = heavy.tokenizer
  prompt_ids = None
  if prompt or s.prompt:
    ids = [tok.bos_id] + list(tok.encode(prompt or s.prompt))
    prompt_ids = np.tile(np.asarray(ids, np.int32)[None], (s.batch_size, 1))
  if seed is not None:
    s.seed = seed
  sampler = scheduled.ScheduledSampler(heavy.method, light.method)
  out = scheduled.sample_batches(heavy, light, s, schedule, seed=s.seed, prompt_ids=prompt_ids,
                                 sampler=sampler)
  n = out["tokens"].shape[0]
  texts = [tok.decode(list(r)) for r in out["tokens"]]
  nfe = np.asarray(out["nfe"], np.float64)
  seq = int(out["prompt_len"]) + int(out["gen_len"])
  fcfg_h = flops_lib.flops_model_config(heavy.config, tok.vocab_size, seq)
  fcfg_l = flops_lib.flops_model_config(light.config, tok.vocab_size, seq)
  flops = flops_lib.flops_report(schedule, fcfg_h, fcfg_l, out["nfe_heavy"], out["nfe_light"])
  gen = int(out["gen_len"])
  summary = dict(step=heavy.step, light_step=light.step, decoder="ancestral", seed=s.seed,
                 schedule=str(schedule), num_steps=schedule.num_steps,
                 num_light_steps=schedule.num_light, num_samples=n, gen_len=gen,
                 mean_nfe=float(nfe.mean()), total_nfe=float(nfe.sum()),
                 mean_nfe_heavy=float(np.mean(out["nfe_heavy"])),
                 mean_nfe_light=float(np.mean(out["nfe_light"])),
                 tokens_per_forward=metrics_lib.tokens_per_forward(np.full(n, gen), nfe),
                 wall_sec_per_sample=out["wall_sec"] / max(n, 1), wall_includes_compile=True,
                 heavy_model=fcfg_h, light_model=fcfg_l, flops=flops)
  _write(out_dir or workdir, texts, out["tokens"], nfe, summary)
  return dict(summary=summary, texts=texts)


def main(argv):
  cli.quiet_library_logs()
  if len(argv) > 1:
    cli.fail(f"Unexpected arguments: {argv[1:]} (flags need '--name=value').")
  if not _WORKDIR.value:
    cli.fail("--workdir is required (the training --workdir to sample from).")
  if bool(_LIGHT.value) != bool(_SCHEDULE.value):
    cli.fail("--light_workdir and --schedule go together (model scheduling needs both).")
  # Categorical draws in float64 (spec: float32 Gumbel noise truncates near 15.9 and lowers
  # the effective temperature); training stays float32/bf16.
  jax.config.update("jax_enable_x64", True)
  try:
    overrides = cli.sample_overrides(_SET.value)
    if _SEED.value is not None:
      if overrides.get("seed", _SEED.value) != _SEED.value:
        cli.fail(f"--seed={_SEED.value} and --config.sample.seed={overrides['seed']} disagree; "
                 "give one of them.")
      overrides["seed"] = _SEED.value
    if _PROMPTS.value or _INFILL.value:
      if _SCHEDULE.value or _PROMPT.value:
        raise app.UsageError("--prompts/--infill do not combine with --schedule or --prompt.")
      res = run_prompts(_WORKDIR.value, overrides, _NUM.value, None, _OUT.value,
                        _STEP.value, not _NO_EMA.value, _PROMPTS.value, _INFILL.value)
    elif _SCHEDULE.value:
      res = run_scheduled_sampling(_WORKDIR.value, _LIGHT.value, _SCHEDULE.value, overrides,
                                   _NUM.value, None, _OUT.value, _STEP.value,
                                   _LIGHT_STEP.value, not _NO_EMA.value, _PROMPT.value)
    else:
      res = run_sampling(_WORKDIR.value, overrides, _NUM.value, None, _OUT.value,
                         _STEP.value, not _NO_EMA.value, _PROMPT.value)
  except (config_lib.ConfigError, ckpt_lib.CheckpointError, ValueError, KeyError,
          paths.StorageError) as e:
    cli.fail(str(e))
  for i, t in enumerate(res["texts"]):
    print(f"--- sample {i} ---\n{t}\n")
  print(json.dumps(res["summary"], indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.sample_flags_parser("sample"))
