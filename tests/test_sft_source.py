"""data.source='sft': the user's prompt/response JSONL (or a scored .npz) in the train loop."""

import json

import jax
import numpy as np
import pytest

from dlm_jax import config as config_lib
from dlm_jax.run import experiment as exp_lib
from dlm_jax.run import trainer
from tests.tiny import tiny_config


def _write_jsonl(path, n=20):
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps(dict(prompt=f"What is {i} plus {i}?", response=f"It is {2 * i}.")) + "\n")


def _config(path, **overrides):
  c = tiny_config(**overrides)
  c.data.source = "sft"
  c.data.path = str(path)
  c.data.seq_len = 48
  c.train.num_steps = 2
  c.train.ckpt_every = 2
  return c


def test_jsonl_sft_trains_and_never_masks_the_prompt(tmp_path):
  path = tmp_path / "pairs.jsonl"
  _write_jsonl(path)
  cfg = _config(path)
  exp = exp_lib.Experiment.create(cfg)
  batch = next(exp_lib.make_train_iterator(exp.config, exp.tokenizer))
  tok = exp.tokenizer
  # Rows are [BOS prompt PAD..][response EOS..]; only response slots are maskable.
  assert np.all(batch["tokens"][:, 0] == tok.bos_id)
  for row, maskable in zip(batch["tokens"], batch["maskable"]):
    first = int(np.argmax(maskable))
    assert maskable[first:].all() and not maskable[:first].any()
    assert tok.decode([t for t in row[first:] if t != tok.eos_id]).startswith("It is ")
    assert tok.decode(list(row[1:first])).startswith("What is ")
  # The SFT loss reads the maskable slots only: a prompt change never changes the masked tokens.
  xt, is_masked, _, _ = exp.method.corrupt(
      {k: np.asarray(v) for k, v in dict(batch, example_id=np.arange(8)).items()},
      jax.random.key(0))
  assert not np.any(np.asarray(is_masked) & ~batch["maskable"])
  # Evaluation reads the set's first train.eval_batches batches in file order.
  ev = list(exp_lib.make_eval_iterator(exp.config, tok))
  assert len(ev) == cfg.train.eval_batches
  assert tok.decode(list(ev[0]["tokens"][1][1:])).startswith("What is 1 plus 1?")
  out = trainer.train(cfg, str(tmp_path / "run"))
  assert np.isfinite(out["loss"])


def test_sft_errors_name_the_setting(tmp_path):
  path = tmp_path / "pairs.jsonl"
  _write_jsonl(path)
  with pytest.raises(config_lib.ConfigError, match="needs teacher difficulty buckets.*score_difficulty"):
    exp = exp_lib.Experiment.create(_config(path, trims__masking="trims"))
    next(exp_lib.make_train_iterator(exp.config, exp.tokenizer))
  with pytest.raises(config_lib.ConfigError, match="data.path"):
    exp_lib.validate_config(_config(tmp_path / "pairs.txt"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "only a prompt"}\n')
  with pytest.raises(config_lib.ConfigError, match=r"bad.jsonl:2: missing field 'response'"):
    exp = exp_lib.Experiment.create(_config(bad))
    next(exp_lib.make_train_iterator(exp.config, exp.tokenizer))
  cfg = _config(path)
  cfg.data.seq_len = 12
  with pytest.raises(config_lib.ConfigError, match="config.data.seq_len = 12"):
    exp = exp_lib.Experiment.create(cfg)
    next(exp_lib.make_train_iterator(exp.config, exp.tokenizer))


def test_scored_jsonl_set_trains_with_trims_and_checks_the_tokenizer(tmp_path):
  from dlm_jax import score_difficulty
  from dlm_jax.data import tokenizers as tokenizers_lib
  from dlm_jax.data.tasks import sft as sft_lib
  path = tmp_path / "pairs.jsonl"
  _write_jsonl(path)
  cfg = _config(tmp_path / "scored.npz", trims__masking="trims",
                trims__weighting="uniform")
  tok = exp_lib.make_tokenizer(cfg)
  data = sft_lib.jsonl_set(str(path), tok, 48, "config.data.seq_len")
  nll = np.random.default_rng(0).gamma(0.5, 1.0, data.response.shape).astype(np.float32)
  sft_lib.write_scored_set(str(tmp_path / "scored.npz"), data, nll, 8,
                                    dict(teacher_tokenizer=tokenizers_lib.tokenizer_id(tok)))
  out = trainer.train(cfg, str(tmp_path / "run"))
  assert np.isfinite(out["loss"])
  sft_lib.write_scored_set(str(tmp_path / "other.npz"), data, nll, 8,
                                    dict(teacher_tokenizer="gpt2 (vocab 50258, fingerprint 0)"))
  cfg.data.path = str(tmp_path / "other.npz")
  with pytest.raises(config_lib.ConfigError, match="scored with the tokenizer gpt2"):
    exp = exp_lib.Experiment.create(cfg)
    next(exp_lib.make_train_iterator(exp.config, exp.tokenizer))
