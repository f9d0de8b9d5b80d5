"""Prompts and infilling for a loaded run: prompts files, templates -> completions.

A prompts file is JSONL, one object per line:

  {"prompt": "In the beginning"}                       a prefix; the decoder continues it
  {"infill": "The [[6]] sat on the [[2]].", "id": 7}   a template (`sampling/templates.py`)

with an optional "id" (any JSON value, copied to the output). Any other key is an error naming
the line. Every prompt or template gives sample.num_samples completions; the records say the
prompt, the completion (a string for a prompt, a list of strings, one per span, for a template),
the whole text, the decoder and its NFE. Given tokens are never changed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Iterable, Sequence

import jax
import ml_collections
import numpy as np

from dlm_jax import parallel
from dlm_jax import paths
from dlm_jax.methods.did import sampler as did_sampler
from dlm_jax.sampling import common
from dlm_jax.sampling import decoders
from dlm_jax.sampling import templates

KNOWN_KEYS = ("id", "infill", "prompt")


@dataclasses.dataclass(frozen=True)
class PromptItem:
  """One prompt: kind "prompt" (prefix) or "infill" (template), its text, an optional id, and
  where it came from (for error messages)."""
  kind: str
  text: str
  id: Any = None
  where: str = ""


def parse_prompt_line(obj: Any, where: str) -> PromptItem:
  """A PromptItem from one decoded JSON value; ValueError naming `where` otherwise."""
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: expected a JSON object like {{\"prompt\": \"...\"}}, got "
                     f"{type(obj).__name__}.")
  unknown = sorted(set(obj) - set(KNOWN_KEYS))
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)} (known: "
                     f"{', '.join(KNOWN_KEYS)}).")
  kinds = [k for k in ("prompt", "infill") if k in obj]
  if len(kinds) != 1:
    raise ValueError(f"{where}: give exactly one of 'prompt' (a prefix) or 'infill' (a "
                     f"template), got {kinds or 'neither'}.")
  text = obj[kinds[0]]
  if not isinstance(text, str):
    raise ValueError(f"{where}: {kinds[0]!r} must be a string, got {type(text).__name__}.")
  return PromptItem(kind=kinds[0], text=text, id=obj.get("id"), where=where)


def read_prompts(path: str) -> list[PromptItem]:
  """The prompts of a JSONL file (blank lines skipped); errors name the file and line."""
  items = []
  if not paths.isfile(path):
    raise ValueError(f"--prompts={path}: no such file.")
  for n, line in enumerate(paths.read_text(path).splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{path} line {n}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not valid JSON ({e.msg}).") from None
    items.append(parse_prompt_line(obj, where))
  if not items:
    raise ValueError(f"{path}: no prompts (one JSON object per line).")
  return items


def as_items(prompts: Iterable[Any], kind: str = "prompt") -> list[PromptItem]:
  """PromptItems from strings (of `kind`), dicts (as in a prompts file) or PromptItems."""
  out = []
  for i, p in enumerate(prompts):
    where = f"prompts[{i}]"
    if isinstance(p, PromptItem):
      out.append(p)
    elif isinstance(p, str):
      out.append(PromptItem(kind=kind, text=p, where=where))
    else:
      out.append(parse_prompt_line(p, where))
  if not out:
    raise ValueError("no prompts given.")
  return out


def _gen_len(s: ml_collections.ConfigDict, seq_len: int, used: int) -> int:
  g = int(s.gen_len) or seq_len - used
  if g < 1:
    raise ValueError(f"the prompt has {used} tokens (BOS included), leaving no room within "
                     f"data.seq_len={seq_len}; set sample.gen_len.")
  return g


def _rows(run: Any, items: Sequence[PromptItem], s: ml_collections.ConfigDict) -> list[Any]:
  """Per item: a templates.MaskedRow (masked methods) or templates.GapRow (insertion)."""
  method, tok = run.method, run.tokenizer
  seq_len = int(run.config.data.seq_len)
  max_len = int(method.model_cfg.max_len)
  rows = []
  for it in items:
    try:
      if method.family == "masked":
        if it.kind == "prompt":
          used = 1 + len(tok.encode(it.text))
          parts = templates.prefix_parts(it.text, _gen_len(s, seq_len, used))
        else:
          parts = templates.parse_template(it.text)
        rows.append(templates.masked_row(parts, tok.encode, tok.bos_id, tok.mask_id, max_len))
      elif method.family == "insertion":
        parts = (templates.prefix_parts(it.text, None) if it.kind == "prompt"
                 else templates.parse_template(it.text))
        given = sum(len(tok.encode(p)) for p in parts if isinstance(p, str))
        cap = int(s.capacity) or (given + int(s.gen_len) if s.gen_len else seq_len)
        if cap + 1 > max_len:
          raise ValueError(f"sample.capacity={cap} (+1 for BOS) is longer than model.max_len="
                           f"{max_len}.")
        rows.append(templates.gap_row(parts, tok.encode, cap))
      else:
        if it.kind != "prompt":
          raise ValueError(f"method {method.name!r} generates left to right; infilling needs an "
                           "MDLM or DID run.")
        rows.append([tok.bos_id] + list(tok.encode(it.text)))
    except ValueError as e:
      raise type(e)(f"{it.where}: {e}" if it.where else str(e)) from None
  return rows


def _capacity(s: ml_collections.ConfigDict, row: templates.GapRow, seq_len: int) -> int:
  return int(s.capacity) or (len(row.ids) + int(s.gen_len) if s.gen_len else seq_len)


def generate(run: Any, prompts: Iterable[Any], s: ml_collections.ConfigDict, seed: int = 0,
             kind: str = "prompt") -> dict[str, Any]:
  """Completions of every prompt or template, sample.num_samples each, in batches of
  sample.batch_size rows (rows of one batch padded to a common length).

  Args:
    run: a `LoadedRun`.
    prompts: strings (of `kind`), dicts {"prompt"|"infill": ..., "id": ...} or PromptItems.
    s: config.sample (decoder and its options, num_samples per prompt, batch_size).
    seed: batch i draws with fold_in(key(seed), i).
    kind: what plain strings are: "prompt" (prefix) or "infill" (template).

  Returns:
    dict(records: one dict per completion (id, prompt, completion, text, decoder, nfe, sample),
    texts, completions, nfe, wall_sec).
  """
  method, tok = run.method, run.tokenizer
  decoder = decoders.check_options(s, method.family, method.default_decoder, method.name)
  items = as_items(prompts, kind)
  rows = _rows(run, items, s)
  per = int(s.num_samples)
  jobs = [(i, k) for i in range(len(items)) for k in range(per)]
  bsz = max(1, int(s.batch_size))
  seq_len = int(run.config.data.seq_len)
  records, wall = [], 0.0
  for bi, start in enumerate(range(0, len(jobs), bsz)):
    batch = jobs[start:start + bsz]
    sb = ml_collections.ConfigDict(s.to_dict())
    sb.batch_size = len(batch)
    key = jax.random.fold_in(jax.random.key(seed), bi)
    t0 = time.perf_counter()
    with parallel.sharding_context(run.mesh):
      if method.family == "masked":
        brows = [rows[i] for i, _ in batch]
        length = max(len(r.ids) for r in brows)
        tokens = np.full((len(batch), length), tok.pad_id, np.int32)
        fill = np.zeros((len(batch), length), bool)
        valid = np.zeros((len(batch), length), bool)
        for j, r in enumerate(brows):
          tokens[j, :len(r.ids)], fill[j, :len(r.ids)], valid[j, :len(r.ids)] = r.ids, r.fill, True
        layout = common.masked_layout(tokens, fill, valid, tok.mask_id)
        out = jax.device_get(method.sample(run.params, key, sb, layout=layout))
      elif method.family == "insertion":
        brows = [rows[i] for i, _ in batch]
        cap = max(_capacity(s, r, seq_len) for r in brows)
        layout = did_sampler.gap_layout([(r.ids, r.open) for r in brows], cap, tok.bos_id)
        out = jax.device_get(method.sample(run.params, key, sb, layout=layout))
      else:
        i0 = batch[0][0]
        same = [j for j in batch if j[0] == i0]
        batch = same  # a causal decoder takes one prompt per call
        sb.batch_size = len(batch)
        prompt = np.tile(np.asarray(rows[i0], np.int32)[None], (len(batch), 1))
        out = jax.device_get(method.sample(run.params, key, sb, prompt=prompt))
    wall += time.perf_counter() - t0
    records += _records(run, items, rows, batch, out, decoder.name)
  # the causal path may have split batches: keep the (prompt, sample) order
  records.sort(key=lambda r: (r["_item"], r["sample"]))
  for r in records:
    del r["_item"]
  return dict(records=records, texts=[r["text"] for r in records],
              completions=[r["completion"] for r in records],
              nfe=np.asarray([r["nfe"] for r in records]), wall_sec=wall)


def _records(run, items, rows, batch, out, decoder_name) -> list[dict]:
  tok = run.tokenizer
  family = run.method.family
  tokens = np.asarray(out["tokens"])
  nfe = np.asarray(out["nfe"]).reshape(len(batch), -1).sum(-1)
  recs = []
  for j, (i, k) in enumerate(batch):
    it, row = items[i], rows[i]
    if family == "masked":
      fills = [tok.decode(tokens[j, pos]) for _, pos in sorted(row.spans.items())]
      ids = tokens[j, :len(row.ids)]
    elif family == "insertion":
      n = int(np.asarray(out["total_lengths"])[j])
      span = np.asarray(out["span"])[j, :n]
      ids = tokens[j, :n]
      opened = sorted({v for v in row.open if v})
      fills = [tok.decode(ids[span == v]) for v in opened]
    else:
      p = len(row)
      fills = [tok.decode(tokens[j, p:])]
      ids = tokens[j]
    rec = dict(prompt=it.text, completion=fills[0] if it.kind == "prompt" else fills,
               text=tok.decode(ids), decoder=decoder_name, nfe=float(nfe[j]), sample=k,
               tokens=[int(x) for x in ids], _item=i)
    if it.kind == "infill":
      rec = dict(rec, infill=True)
    if it.id is not None:
      rec = dict(id=it.id, **rec)
    recs.append(rec)
  return recs


def infill_items(template: Any = None, text: str | None = None,
                 spans: Sequence[tuple[int, int, Any]] | None = None,
                 family: str = "masked") -> list[PromptItem]:
  """PromptItems for `LoadedRun.infill`: templates, or one text with character-range spans."""
  if text is not None or spans is not None:
    if template is not None or text is None or spans is None:
      raise ValueError("give either template(s) or text= with spans=[(start, end, n_tokens), ...].")
    parts = templates.spans_to_template(text, list(spans))
    tpl = "".join(p.replace("[[", "\\[[") if isinstance(p, str) else p.marker for p in parts)
    return [PromptItem(kind="infill", text=tpl, where="spans")]
  if template is None:
    raise ValueError("give a template (e.g. 'The [[4]] sat.') or text= with spans=.")
  del family
  tpls = [template] if isinstance(template, str) else list(template)
  return [PromptItem(kind="infill", text=t, where=f"template {i + 1}" if len(tpls) > 1 else "template")
          for i, t in enumerate(tpls)]
