"""Supervised fine-tuning sets: prompt/response pairs, TRIMS-scored set files, and the data source 'sft'.

Layout of every SFT row: [BOS prompt, PAD..][response, EOS..]; only response slots are maskable.

- `load_prompt_response_jsonl` / `jsonl_set`: the user's JSONL ({"prompt": ..., "response": ...} per
  line); `dlm_jax.data.tasks.arith.arith_set`: a generated ARITH-CHAIN set.
- The scored set (`score_dataset` writes it, `load_sft_set` reads it) is an .npz holding

    prompt [N, P] int32, response [N, R] int32, example_id [N] int32, response_len [N] int32,
    nll [N, R] float32 (0 off the valid slots), buckets [N, R] int8 (hard_first),
    buckets_easy_first [N, R] int8, buckets_random [N, R] int8 (seeded by example id),
    bucket_mean_nll [K] float32, answer [N] int32 (ARITH-CHAIN only), meta (a JSON string),

  so one scored file serves every `config.trims.masking` arm. A JSON summary lies next to it
  (`<out>.json`); partial results go to `<out>.partial.npz`, from which a re-run resumes.
- `SOURCE` (data source 'sft'): fine-tuning on `config.data.path`, a scored .npz (every masking
  scheme) or a .jsonl (standard masking only), in seeded epochs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import time
from typing import Any, Callable, Sequence, Union

import numpy as np

from dlm_jax import paths
from dlm_jax.config import ConfigError
from dlm_jax.data.base import DataSource, configured_tokenizer, require
from dlm_jax.data.tasks.common import TaskIterator, prompt_response_rows, seed_of
from dlm_jax.data.tokenizers import tokenizer_id
from dlm_jax.trims import buckets as buckets_lib
from dlm_jax.trims import masks as masks_lib

ORDERS = {"hard_first": "buckets", "easy_first": "buckets_easy_first", "random": "buckets_random"}
"""Bucket order -> array name in the scored file."""


class SFTDataError(ValueError):
  """A setting or an input line that makes an SFT set unusable; the message names it."""


def load_prompt_response_jsonl(path: Union[str, os.PathLike], tokenizer_encode: Callable[[str], Sequence[int]],
                               max_len: int, prompt_key: str = "prompt",
                               response_key: str = "response") -> list[dict[str, Any]]:
  """Read SFT pairs: one JSON object per line with string fields `prompt_key` and `response_key`.

  Blank lines are skipped. Each example is {"prompt": int32 [P], "response": int32 [R], "example_id": int (0-based
  index among the examples), "line": int (1-based line number)}.

  Args:
    path: the .jsonl file.
    tokenizer_encode: text -> token ids.
    max_len: the largest allowed P + R.
    prompt_key: field holding the prompt text.
    response_key: field holding the response text.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: naming the file and line, for a line that is not a JSON object, lacks a field, has a non-string
      field, an empty response, or P + R > max_len; and for a file without any example.
  """
  path = os.fspath(path)
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2, got {max_len}")
  examples = []
  with io.StringIO(paths.read_text(path)) as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
      for key in (prompt_key, response_key):
        if key not in obj:
          raise ValueError(f"{where}: missing field {key!r} (fields present: {sorted(obj)})")
        if not isinstance(obj[key], str):
          raise ValueError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
      prompt = np.asarray(list(tokenizer_encode(obj[prompt_key])), np.int32)
      response = np.asarray(list(tokenizer_encode(obj[response_key])), np.int32)
      if response.size == 0:
        raise ValueError(f"{where}: field {response_key!r} encodes to no tokens")
      total = prompt.size + response.size
      if total > max_len:
        raise ValueError(f"{where}: prompt + response is {total} tokens ({prompt.size} + {response.size}), "
                         f"longer than max_len = {max_len}")
      examples.append({"prompt": prompt, "response": response, "example_id": len(examples), "line": lineno})
  if not examples:
    raise ValueError(f"{path}: no examples (the file is empty or blank)")
  return examples


@dataclasses.dataclass
class SFTSet:
  """Prompt/response pairs in the fixed-width layout of the scored file.

  Attributes:
    prompt: [N, P] int32, prompt tokens then PAD (never masked).
    response: [N, R] int32, response tokens then EOS fill (learned, scored, maskable).
    example_id: [N] int32 stable ids.
    response_len: [N] int32 response tokens before the EOS fill.
    extra: other per-example arrays to store (e.g. ARITH-CHAIN answers).
    spec: the --data value it came from.
  """
  prompt: np.ndarray
  response: np.ndarray
  example_id: np.ndarray
  response_len: np.ndarray
  extra: dict[str, np.ndarray]
  spec: str

  def __len__(self) -> int:
    return int(self.prompt.shape[0])


def jsonl_set(path: str, tokenizer: Any, max_len: int, limit_name: str) -> SFTSet:
  """Prompt/response JSONL of real users, laid out as [prompt, PAD..][response, EOS..].

  P = longest prompt (BOS prepended), R = longest response + 1 (at least one EOS to learn).

  Args:
    path: the .jsonl file (fields "prompt" and "response", strings).
    tokenizer: has encode(text) -> ids, bos_id, eos_id, pad_id.
    max_len: largest allowed P + R (the model's length).
    limit_name: the setting `max_len` comes from, named in errors.

  Raises:
    ScoringError: naming the file and line of a bad example, or the setting that is too small.
  """
  if not paths.exists(path):
    raise SFTDataError(f"--data={path!r} does not exist.")
  try:
    # BOS before the prompt and one EOS after the response must fit too.
    rows = load_prompt_response_jsonl(path, tokenizer.encode, max_len - 2)
  except ValueError as e:
    raise SFTDataError(f"{e} (the limit is {limit_name} = {max_len}, minus BOS and one EOS)") from None
  p_max = 1 + max(len(r["prompt"]) for r in rows)
  r_max = 1 + max(len(r["response"]) for r in rows)
  if p_max + r_max > max_len:
    lp = max(rows, key=lambda r: len(r["prompt"]))["line"]
    lr = max(rows, key=lambda r: len(r["response"]))["line"]
    raise SFTDataError(
        f"{path}: the longest prompt (line {lp}, {p_max} tokens with BOS) plus the longest response "
        f"(line {lr}, {r_max} tokens with EOS) do not fit in {limit_name} = {max_len} in the fixed "
        "prompt/response layout; shorten them or raise the limit.")
  n = len(rows)
  prompt = np.full((n, p_max), tokenizer.pad_id, np.int32)
  response = np.full((n, r_max), tokenizer.eos_id, np.int32)
  for i, r in enumerate(rows):
    ids = [tokenizer.bos_id] + list(r["prompt"])
    prompt[i, :len(ids)] = ids
    response[i, :len(r["response"])] = r["response"]
  return SFTSet(prompt=prompt, response=response, example_id=np.arange(n, dtype=np.int32),
                response_len=np.array([len(r["response"]) for r in rows], np.int32),
                extra=dict(line=np.array([r["line"] for r in rows], np.int32)), spec=path)


def bucket_arrays(nll: np.ndarray, valid: np.ndarray, example_id: np.ndarray, K: int) -> dict[str, np.ndarray]:
  """Buckets of every order: {'buckets', 'buckets_easy_first', 'buckets_random'} int8 [N, R]."""
  out = {}
  for order, name in ORDERS.items():
    seed = example_id if order == "random" else None
    out[name] = buckets_lib.assign_buckets(nll, valid, K=K, order=order, seed=seed)
  return out


def bucket_mean_nll(nll: np.ndarray, buckets: np.ndarray, K: int) -> np.ndarray:
  """Mean teacher NLL of the slots of each hard-first bucket 1..K -> float64 [K] (NaN if empty)."""
  out = np.full((K,), np.nan)
  for k in range(1, K + 1):
    sel = buckets == k
    if sel.any():
      out[k - 1] = float(nll[sel].mean())
  return out


def response_valid(data: SFTSet) -> np.ndarray:
  """[N, R] bool: the slots that are scored, bucketed and maskable (the whole response incl. EOS fill)."""
  return np.ones(data.response.shape, bool)


def _atomic_savez(path: str, **arrays: Any) -> None:
  paths.save_npz(path, **arrays)  # local: a temporary file then a rename; gs://: one upload


def partial_path(out: str) -> str:
  return (out[:-4] if out.endswith(".npz") else out) + ".partial.npz"


def write_scored_set(out: str, data: SFTSet, nll: np.ndarray, num_buckets: int,
                     meta: dict[str, Any]) -> dict[str, Any]:
  """Buckets `nll` [N, R] in every order and writes the scored file `out` plus `<out>.json`.

  Returns:
    The summary (meta plus K, bucket_mean_nll [K], mean_nll, the bucket 1 / bucket K ratio, out).
  """
  valid = response_valid(data)
  nll = np.where(valid, nll, 0.0).astype(np.float32)
  buckets = bucket_arrays(nll, valid, data.example_id, num_buckets)
  means = bucket_mean_nll(nll, buckets["buckets"], num_buckets)
  summary = dict(meta, num_buckets=num_buckets, bucket_mean_nll=[float(x) for x in means],
                 mean_nll=float(nll[valid].mean()), ratio_bucket1_to_bucketK=float(means[0] / max(means[-1], 1e-12)),
                 out=paths.absolute(out))
  _atomic_savez(out, prompt=data.prompt.astype(np.int32), response=data.response.astype(np.int32),
                example_id=data.example_id.astype(np.int32), response_len=data.response_len.astype(np.int32),
                nll=nll, bucket_mean_nll=means.astype(np.float32), num_buckets=np.int32(num_buckets),
                meta=json.dumps(summary), **buckets, **data.extra)
  paths.write_text(os.path.splitext(out)[0] + ".json", json.dumps(summary, indent=2))
  return summary


def score_dataset(scorer: Callable[[np.ndarray, np.ndarray], np.ndarray], data: SFTSet, out: str,
                  meta: dict[str, Any], *, num_buckets: int = 8, batch_size: int = 256,
                  save_every: int = 4096, stop_after: int | None = None,
                  progress: bool = True) -> dict[str, Any] | None:
  """Scores `data` with `scorer`, writes `out` (.npz) and its JSON summary; resumes a partial run.

  Args:
    scorer: (prompt [b, P], response [b, R]) -> difficulty [b, R] for b <= batch_size (e.g.
      `dlm_jax.trims.scoring.make_scorer`).
    data: the examples.
    out: output path (.npz).
    meta: what identifies this scoring run (teacher, data, settings); a partial file written with
      other meta is refused rather than mixed in.
    num_buckets: K.
    batch_size: examples per scorer call.
    save_every: write partial results every this many examples (rounded up to whole batches).
    stop_after: stop (after saving the partial file) once this many examples are done in total;
      simulates an interruption in tests.
    progress: print a progress line to stderr.

  Returns:
    The summary dict (also written to `<out>.json`), or None when stopped by `stop_after`.
  """
  if not out.endswith(".npz"):
    raise SFTDataError(f"--out={out!r} must end in .npz.")
  n, r = data.response.shape
  part = partial_path(out)
  done = 0
  nll = np.zeros((n, r), np.float32)
  if paths.exists(part):
    z = paths.load_npz(part)
    pmeta = json.loads(str(z["meta"]))
    if pmeta != meta:
      diff = sorted(k for k in set(meta) | set(pmeta) if meta.get(k) != pmeta.get(k))
      raise SFTDataError(f"{part} was written by a different scoring run (differs in {diff}); delete it "
                         "to start over, or re-run with the original settings to resume.")
    done = int(z["done"])
    nll[:done] = z["nll"][:done]
    if progress:
      print(f"Resuming {out}: {done}/{n} examples already scored.", file=sys.stderr, flush=True)
  save_every = max(batch_size, -(-int(save_every) // batch_size) * batch_size)
  t0, start, last_saved = time.perf_counter(), done, done
  while done < n:
    hi = min(done + batch_size, n)
    nll[done:hi] = scorer(data.prompt[done:hi], data.response[done:hi])
    done = hi
    if done - last_saved >= save_every or done == n or (stop_after is not None and done >= stop_after):
      _atomic_savez(part, nll=nll[:done], done=np.int64(done), meta=json.dumps(meta))
      last_saved = done
    if progress:
      rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
      eta = (n - done) / max(rate, 1e-9)
      print(f"\rscoring {done}/{n} examples ({100.0 * done / n:5.1f}%), {rate:,.0f} ex/s, ETA {eta:,.0f} s, "
            f"saved up to {last_saved}", end="", file=sys.stderr, flush=True)
    if stop_after is not None and done >= stop_after and done < n:
      if progress:
        print("", file=sys.stderr, flush=True)
      return None
  if progress:
    print("", file=sys.stderr, flush=True)

  summary = write_scored_set(out, data, nll, num_buckets, meta)
  paths.remove(part)
  return summary


def load_sft_set(path: str) -> dict[str, np.ndarray]:
  """Reads a prepared SFT set (.npz); errors name the file and the missing field."""
  if not paths.exists(path):
    raise FileNotFoundError(f"config.data.path={path!r} does not exist; prepare it with "
                            "`python -m dlm_jax.score_difficulty`.")
  data = paths.load_npz(path)
  for field in ("prompt", "response"):
    if field not in data:
      raise ValueError(f"{path}: missing array {field!r} (expected prompt, response, "
                       "example_id[, buckets]).")
  data.setdefault("example_id", np.arange(len(data["prompt"]), dtype=np.int32))
  return data


def training_arrays(data: dict[str, np.ndarray], masking: str, num_buckets: int,
                    path: str = "") -> dict[str, np.ndarray]:
  """The per-example arrays a training run reads from a scored set, for `config.trims.masking`.

  The bucket ORDER of a masking scheme is applied offline (`trims.masks.masking_for`): 'trims'
  reads the hard-first `buckets`, 'trims_easy_first' `buckets_easy_first`, 'random_buckets'
  `buckets_random` (a per-response permutation seeded by the example id, fixed for the run);
  'random' needs none. When the stored K differs from `num_buckets` (or an order is missing), the
  buckets are recomputed from the stored teacher scores `nll`.

  Args:
    data: arrays of `load_sft_set`.
    masking: config.trims.masking.
    num_buckets: config.trims.num_buckets.
    path: the file, for error messages.

  Returns:
    {prompt [N, P], response [N, R], example_id [N]} plus buckets [N, R] int8 for TRIMS schemes.

  Raises:
    ValueError: naming the file and the missing field.
  """
  out = {k: data[k] for k in ("prompt", "response", "example_id")}
  order = masks_lib.masking_for(masking).bucket_order
  if order is None:
    return out
  field = ORDERS[order]
  stored_k = int(data["num_buckets"]) if "num_buckets" in data else None
  if field in data and (stored_k is None or stored_k == num_buckets):
    out["buckets"] = data[field]
  elif "nll" in data:
    seed = data["example_id"] if order == "random" else None
    out["buckets"] = buckets_lib.assign_buckets(data["nll"], np.ones(data["nll"].shape, bool),
                                                K=num_buckets, order=order, seed=seed)
  else:
    raise ValueError(f"{path}: config.trims.masking={masking!r} needs the array {field!r} "
                     f"with K = config.trims.num_buckets = {num_buckets} (stored K: "
                     f"{stored_k}) or the teacher scores 'nll'; re-run "
                     "`python -m dlm_jax.score_difficulty`.")
  if out["buckets"].shape != out["response"].shape:
    raise ValueError(f"{path}: buckets have shape {out['buckets'].shape}, responses "
                     f"{out['response'].shape}.")
  return out


def _epoch_iterator(data: dict[str, np.ndarray], bs: int, seed: int, shuffle: bool,
                    num_batches: int | None) -> TaskIterator:
  """Seeded epochs over an SFT set's examples (fixed order when not `shuffle`)."""
  n = len(data["prompt"])
  if n < bs:
    raise ConfigError(f"config.data.path has {n} examples, fewer than "
                      f"config.train.global_batch_size={bs}.")
  per_epoch = n // bs

  def make(i):
    epoch, j = divmod(i, per_epoch)
    perm = (np.random.default_rng(seed_of(seed, "sft", epoch)).permutation(n) if shuffle
            else np.arange(n))
    idx = perm[j * bs:(j + 1) * bs]
    return prompt_response_rows({k: v[idx] for k, v in data.items()}, 0)
  return TaskIterator(make, bs, num_batches)


def scored_set_iterator(config: Any, batch_size: int, shuffle: bool,
                        num_batches: int | None) -> TaskIterator:
  """Epochs over the scored set at config.data.path with the buckets of config.trims.masking."""
  path = config.data.path
  data = training_arrays(load_sft_set(path), config.trims.masking, config.trims.num_buckets, path)
  return _epoch_iterator(data, batch_size, config.seed, shuffle=shuffle, num_batches=num_batches)


def _iterator(config: Any, tokenizer: Any, split: str, batch_size: int) -> TaskIterator:
  """Fine-tuning on prompt/response pairs of any tokenizer (data.source='sft').

  `config.data.path` is either a scored set (.npz of `python -m dlm_jax.score_difficulty`, which
  every masking scheme can read) or the user's prompt/response JSONL (standard masking only:
  TRIMS needs the teacher's scores). Evaluation reads the first `train.eval_batches` batches of
  the same set in file order (an SFT set has no split of its own).
  """
  d = config.data
  evaluating = split != "train"
  num_batches = config.train.eval_batches if evaluating else None
  path = d.path
  if path.endswith(".jsonl"):
    if masks_lib.masking_for(config.trims.masking).bucket_order is not None:
      raise ConfigError(
          f"config.trims.masking={config.trims.masking!r} needs teacher difficulty buckets; "
          f"score {path} first (`python -m dlm_jax.score_difficulty --data={path} ...`) and set "
          "config.data.path to the .npz it writes.")
    try:
      rows = jsonl_set(path, tokenizer, d.seq_len, "config.data.seq_len")
    except SFTDataError as e:
      raise ConfigError(str(e)) from None
    data = dict(prompt=rows.prompt, response=rows.response, example_id=rows.example_id)
    return _epoch_iterator(data, batch_size, config.seed, shuffle=not evaluating,
                           num_batches=num_batches)
  raw = load_sft_set(path)
  if "meta" in raw:
    stored = json.loads(str(raw["meta"])).get("teacher_tokenizer")
    mine = tokenizer_id(tokenizer)
    if stored and stored != mine:
      raise ConfigError(
          f"config.data.path={path!r} was scored with the tokenizer {stored}, but "
          f"config.data.tokenizer gives {mine}; use the tokenizer the set was prepared with.")
  width = raw["prompt"].shape[1] + raw["response"].shape[1]
  if width > d.seq_len:
    raise ConfigError(
        f"config.data.seq_len={d.seq_len} is shorter than the rows of {path} (prompt "
        f"{raw['prompt'].shape[1]} + response {raw['response'].shape[1]} = {width}).")
  return scored_set_iterator(config, batch_size, shuffle=not evaluating, num_batches=num_batches)


def _check(config: Any) -> None:
  d = config.data
  require(d.path.endswith((".npz", ".jsonl")), "data.path",
          f"{d.path!r}; data.source='sft' reads a prompt/response .jsonl or a scored .npz "
          "(python -m dlm_jax.score_difficulty).")
  require(paths.exists(d.path), "data.path", f"{d.path!r} does not exist.")


SOURCE = DataSource(
    "sft", make_tokenizer=configured_tokenizer,  # a BPE is trained on the embedded corpus, so a
    # model pretrained on the embedded default fine-tunes with its own tokenizer
    train_iterator=lambda config, tok: _iterator(config, tok, "train",
                                                 config.train.global_batch_size),
    eval_iterator=lambda config, tok, bs: _iterator(config, tok, "validation", bs),
    check=_check)
