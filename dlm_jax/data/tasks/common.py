"""Synthetic tasks in the train loop: ARITH-CHAIN (exact answers) and HMM-16 (exact likelihood).

Batches are pure functions of (seed, split, batch index), so the iterator's checkpointed
state is one integer and every process draws the same global batch and keeps its own rows.
A prepared SFT set (`.npz` with prompt, response, example_id and optional buckets, written by
`python -m dlm_jax.score_difficulty`) is iterated in seeded epochs instead of a fresh stream.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

import jax
import numpy as np

from dlm_jax import config_lib
from dlm_jax.data import tasks


class TaskTokenizer:
  """Fixed-vocabulary tokenizer of a synthetic task (ids are the task's own symbols)."""

  def __init__(self, name: str, symbols: tuple[str, ...], bos: int, eos: int, pad: int, mask: int):
    self.name = name
    self.symbols = symbols
    self.bos_id, self.eos_id, self.pad_id, self.mask_id = bos, eos, pad, mask
    self.vocab_size = len(symbols)
    self._index = {s: i for i, s in enumerate(symbols)}

  def encode(self, text: str) -> list[int]:
    out = []
    for ch in text:
      if ch.isspace():
        continue
      if ch not in self._index:
        raise ValueError(f"{self.name}: character {ch!r} is not in the task's vocabulary.")
      out.append(self._index[ch])
    return out

  def decode(self, ids) -> str:
    special = {self.bos_id, self.eos_id, self.pad_id, self.mask_id}
    return "".join(self.symbols[int(i)] for i in ids
                   if 0 <= int(i) < self.vocab_size and int(i) not in special)

  def decode_batch(self, batch) -> list[str]:
    return [self.decode(r) for r in np.asarray(batch)]

  def fingerprint(self) -> str:
    return hashlib.sha256(("|".join(self.symbols) + self.name).encode()).hexdigest()[:16]


def arith_tokenizer() -> TaskTokenizer:
  return TaskTokenizer("arith", tasks.ARITH_SYMBOLS, bos=tasks.BOS, eos=tasks.EOS,
                       pad=tasks.PAD, mask=tasks.MASK)


HMM_BOS, HMM_MASK, HMM_PAD = 16, 17, 18


def hmm_tokenizer() -> TaskTokenizer:
  symbols = tuple("abcdefghijklmnop") + ("^", "_", ".")
  return TaskTokenizer("hmm16", symbols, bos=HMM_BOS, eos=HMM_PAD, pad=HMM_PAD, mask=HMM_MASK)


def _seed_of(*parts: Any) -> int:
  h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
  return int.from_bytes(h[:8], "little")


class TaskIterator:
  """Local batches of batch i = make_global(i) restricted to this process's rows.

  State is {"n": next batch index}; get_state/set_state are dicts (JSON-safe).
  """

  def __init__(self, make_global: Callable[[int], dict[str, np.ndarray]], global_batch: int,
               num_batches: int | None = None):
    pc, pi = jax.process_count(), jax.process_index()
    if global_batch % pc:
      raise config_lib.ConfigError(f"config.train.global_batch_size={global_batch} is not "
                                   f"divisible by the {pc} processes.")
    self._make = make_global
    self._local = global_batch // pc
    self._lo = pi * self._local
    self._n = 0
    self._limit = num_batches

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._limit is not None and self._n >= self._limit:
      raise StopIteration
    batch = self._make(self._n)
    self._n += 1
    return {k: v[self._lo:self._lo + self._local] for k, v in batch.items()}

  def get_state(self) -> dict[str, int]:
    return {"n": self._n}

  def set_state(self, state: dict[str, int]) -> None:
    self._n = int(state["n"])


def _arith_rows(ex: dict[str, np.ndarray], start_id: int) -> dict[str, np.ndarray]:
  prompt, response = ex["prompt"], ex["response"]
  b, p = prompt.shape
  r = response.shape[1]
  tokens = np.concatenate([prompt, response], axis=1).astype(np.int32)
  maskable = np.zeros_like(tokens, bool)
  maskable[:, p:] = True
  out = dict(tokens=tokens, segment_ids=np.ones_like(tokens),
             positions=np.broadcast_to(np.arange(p + r, dtype=np.int32), tokens.shape).copy(),
             maskable=maskable,
             example_id=np.asarray(ex.get("example_id", start_id + np.arange(b)), np.int32))
  if "buckets" in ex:
    buckets = np.zeros_like(tokens, np.int32)
    buckets[:, p:] = ex["buckets"]
    out["buckets"] = buckets
  return out


def load_sft_set(path: str) -> dict[str, np.ndarray]:
  """Reads a prepared SFT set (.npz); errors name the file and the missing field."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.data.path={path!r} does not exist; prepare it with "
                            "`python -m dlm_jax.score_difficulty`.")
  with np.load(path) as z:
    data = {k: z[k] for k in z.files}
  for field in ("prompt", "response"):
    if field not in data:
      raise ValueError(f"{path}: missing array {field!r} (expected prompt, response, "
                       "example_id[, buckets]).")
  data.setdefault("example_id", np.arange(len(data["prompt"]), dtype=np.int32))
  return data


_ORDER_FIELDS = {"hard_first": "buckets", "easy_first": "buckets_easy_first", "random": "buckets_random"}


def sft_training_arrays(data: dict[str, np.ndarray], masking: str, num_buckets: int,
                        path: str = "") -> dict[str, np.ndarray]:
  """The per-example arrays a training run reads from a scored set, for `config.diffusion.masking`.

  The bucket ORDER of a masking scheme is applied offline (`trims.masking_for`): 'trims' reads the
  hard-first `buckets`, 'trims_easy_first' `buckets_easy_first`, 'random_buckets'
  `buckets_random` (a per-response permutation seeded by the example id, fixed for the run);
  'random' needs none. When the stored K differs from `num_buckets` (or an order is missing), the
  buckets are recomputed from the stored teacher scores `nll`.

  Args:
    data: arrays of `load_sft_set`.
    masking: config.diffusion.masking.
    num_buckets: config.diffusion.trims_buckets.
    path: the file, for error messages.

  Returns:
    {prompt [N, P], response [N, R], example_id [N]} plus buckets [N, R] int8 for TRIMS schemes.

  Raises:
    ValueError: naming the file and the missing field.
  """
  from dlm_jax.diffusion import trims  # pylint: disable=g-import-not-at-top
  out = {k: data[k] for k in ("prompt", "response", "example_id")}
  order = trims.masking_for(masking).bucket_order
  if order is None:
    return out
  field = _ORDER_FIELDS[order]
  stored_k = int(data["num_buckets"]) if "num_buckets" in data else None
  if field in data and (stored_k is None or stored_k == num_buckets):
    out["buckets"] = data[field]
  elif "nll" in data:
    seed = data["example_id"] if order == "random" else None
    out["buckets"] = trims.assign_buckets(data["nll"], np.ones(data["nll"].shape, bool),
                                          K=num_buckets, order=order, seed=seed)
  else:
    raise ValueError(f"{path}: config.diffusion.masking={masking!r} needs the array {field!r} "
                     f"with K = config.diffusion.trims_buckets = {num_buckets} (stored K: "
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
    raise config_lib.ConfigError(f"config.data.path has {n} examples, fewer than "
                                 f"config.train.global_batch_size={bs}.")
  per_epoch = n // bs

  def make(i):
    epoch, j = divmod(i, per_epoch)
    perm = (np.random.default_rng(_seed_of(seed, "sft", epoch)).permutation(n) if shuffle
            else np.arange(n))
    idx = perm[j * bs:(j + 1) * bs]
    return _arith_rows({k: v[idx] for k, v in data.items()}, 0)
  return TaskIterator(make, bs, num_batches)


def make_sft_iterator(config, tokenizer, split: str = "train", batch_size: int | None = None):
  """Supervised fine-tuning on prompt/response pairs of any tokenizer (`data.source='sft'`).

  `config.data.path` is either a scored set (.npz of `python -m dlm_jax.score_difficulty`, which
  every masking scheme can read) or the user's prompt/response JSONL (random masking only: TRIMS
  needs the teacher's scores). Rows are [BOS prompt, PAD..][response, EOS..]; only response
  slots are maskable, prompt tokens never are. Evaluation reads the first
  `train.eval_batches` batches of the same set in file order (an SFT set has no split of its own).
  """
  from dlm_jax import score_difficulty  # pylint: disable=g-import-not-at-top
  from dlm_jax.diffusion import trims  # pylint: disable=g-import-not-at-top
  d = config.data
  bs = batch_size or config.train.global_batch_size
  evaluating = split != "train"
  path = d.path
  if path.endswith(".jsonl"):
    if trims.masking_for(config.diffusion.masking).bucket_order is not None:
      raise config_lib.ConfigError(
          f"config.diffusion.masking={config.diffusion.masking!r} needs teacher difficulty buckets; "
          f"score {path} first (`python -m dlm_jax.score_difficulty --data={path} ...`) and set "
          "config.data.path to the .npz it writes.")
    try:
      sft = score_difficulty.jsonl_set(path, tokenizer, d.seq_len, "config.data.seq_len")
    except score_difficulty.ScoringError as e:
      raise config_lib.ConfigError(str(e)) from None
    data = dict(prompt=sft.prompt, response=sft.response, example_id=sft.example_id)
  else:
    raw = load_sft_set(path)
    if "meta" in raw:
      import json  # pylint: disable=g-import-not-at-top
      stored = json.loads(str(raw["meta"])).get("teacher_tokenizer")
      mine = score_difficulty.tokenizer_id(tokenizer)
      if stored and stored != mine:
        raise config_lib.ConfigError(
            f"config.data.path={path!r} was scored with the tokenizer {stored}, but "
            f"config.data.tokenizer gives {mine}; use the tokenizer the set was prepared with.")
    data = sft_training_arrays(raw, config.diffusion.masking, config.diffusion.trims_buckets,
                               path)
    width = data["prompt"].shape[1] + data["response"].shape[1]
    if width > d.seq_len:
      raise config_lib.ConfigError(
          f"config.data.seq_len={d.seq_len} is shorter than the rows of {path} (prompt "
          f"{data['prompt'].shape[1]} + response {data['response'].shape[1]} = {width}).")
  return _epoch_iterator(data, bs, config.seed, shuffle=not evaluating,
                         num_batches=config.train.eval_batches if evaluating else None)


def make_task_iterator(config, tokenizer, split: str = "train", batch_size: int | None = None):
  """Iterator over ARITH-CHAIN or HMM-16 batches for `config.data.source` in {arith, hmm}."""
  del tokenizer
  d = config.data
  bs = batch_size or config.train.global_batch_size
  seed = config.seed
  evaluating = split != "train"
  num_batches = config.train.eval_batches if evaluating else None
  if d.source == "arith":
    task = tasks.ArithChain()
    need = task.prompt_len + task.response_len
    if d.seq_len != need:
      raise config_lib.ConfigError(f"config.data.seq_len must be {need} for ARITH-CHAIN "
                                   f"(prompt {task.prompt_len} + response {task.response_len}).")
    if d.path and not evaluating:
      data = sft_training_arrays(load_sft_set(d.path), config.diffusion.masking,
                                 config.diffusion.trims_buckets, d.path)
      return _epoch_iterator(data, bs, seed, shuffle=True, num_batches=num_batches)

    def make(i):
      ex = task.generate(_seed_of(seed, split, i), bs)
      return _arith_rows(ex, i * bs)
    return TaskIterator(make, bs, num_batches)

  if d.source == "hmm":
    hmm = tasks.HMM16()
    length = d.seq_len - 1

    def make(i):
      x = hmm.sample(_seed_of(seed, "hmm", split, i), bs, length)
      tokens = np.concatenate([np.full((bs, 1), HMM_BOS), x], axis=1).astype(np.int32)
      return dict(tokens=tokens, segment_ids=np.ones_like(tokens),
                  positions=np.broadcast_to(np.arange(d.seq_len, dtype=np.int32),
                                            tokens.shape).copy())
    return TaskIterator(make, bs, num_batches)
  raise config_lib.ConfigError(f"config.data.source={d.source!r} is not a synthetic task.")
