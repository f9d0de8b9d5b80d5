"""TRIMS in the train loop: masks under sharding, batch order and resume; teacher scoring; JSONL."""

import json
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import arith_sft_standard
from configs import arith_sft_standard_uniform
from configs import arith_sft_trims
from configs import arith_teacher
from dlm_jax.run import api
from dlm_jax.run import experiment as exp_lib
from dlm_jax import parallel
from dlm_jax import score_difficulty
from dlm_jax.data.tasks import sft as sft_lib
from dlm_jax.run import trainer
from dlm_jax.data.tasks import arith as task_pipeline
from dlm_jax.data.tasks import arith as arith_task
from dlm_jax.data import tokenizers
from tests.tiny import apply_overrides

MASKINGS = ("random", "trims", "trims_easy_first", "random_buckets")
P, R = 10, 25


def _shrink(c, **overrides):
  c.model.num_layers = 2
  c.model.d_model = 32
  c.model.num_heads = 2
  c.train.global_batch_size = 8
  c.train.num_steps = 4
  c.train.log_every = 2
  c.train.ckpt_every = 2
  c.train.print_batch = False
  c.data.prefetch = 0
  c.optim.warmup_steps = 1
  return apply_overrides(c, **overrides)


@pytest.fixture(scope="module")
def scored_set(tmp_path_factory):
  """A scored ARITH-CHAIN set with synthetic difficulty scores (no teacher needed)."""
  path = str(tmp_path_factory.mktemp("sft") / "sft.npz")
  data = arith_task.arith_set("arith:seed=11,n=64")
  nll = np.random.default_rng(0).gamma(0.5, 1.0, data.response.shape).astype(np.float32)
  sft_lib.write_scored_set(path, data, nll, 8, dict(data=data.spec))
  return path


def _sft_config(masking, path, **overrides):
  base = arith_sft_standard if masking == "random" else arith_sft_trims
  c = base.get_config()
  c.trims.masking = masking
  c.data.path = path
  c.train.init_from = ""
  return _shrink(c, **overrides)


def _mesh(n):
  cfg = ml_collections.ConfigDict(dict(data=n, fsdp=1, tensor=1))
  return parallel.make_mesh(cfg, jax.devices()[:n])


def _first_batch(exp):
  it = exp_lib.make_train_iterator(exp.config, exp.tokenizer)
  return {k: np.asarray(v) for k, v in next(it).items()}


_JITTED = {}


def _corrupt_and_loss(exp, batch_np, step=3):
  """The train step's masks and loss, jitted over the global batch sharded on exp.mesh."""
  batch = parallel.global_batch_from_local(batch_np, exp.mesh)
  if id(exp) not in _JITTED:
    params = exp.init_state(0).params

    def f(params, batch, step):
      key = jax.random.fold_in(jax.random.key(exp.config.seed), step)  # what train_step does
      xt, is_masked, t, _ = exp.method.corrupt(batch, key)
      loss, _ = exp.method.train_loss(params, batch, key, train=True)
      return xt, is_masked, t, loss

    rep = parallel.replicated(exp.mesh)
    fn = jax.jit(f, out_shardings=(rep, rep, rep, rep))
    _JITTED[id(exp)] = (exp, params, parallel.in_sharding_context(fn, exp.mesh))
  _, params, fn = _JITTED[id(exp)]
  out = fn(params, batch, jnp.int32(step))
  return [np.asarray(x) for x in jax.device_get(out)]


@pytest.mark.parametrize("masking", MASKINGS)
def test_masks_identical_on_1_and_8_devices_and_prompt_never_masked(masking, scored_set):
  cfg = _sft_config(masking, scored_set)
  exp1 = exp_lib.Experiment.create(cfg, mesh=_mesh(1))
  exp8 = exp_lib.Experiment.create(cfg, mesh=_mesh(8), tokenizer=exp1.tokenizer)
  batch = _first_batch(exp1)
  xt1, m1, t1, l1 = _corrupt_and_loss(exp1, batch)
  xt8, m8, t8, l8 = _corrupt_and_loss(exp8, batch)
  np.testing.assert_array_equal(m1, m8)
  np.testing.assert_array_equal(xt1, xt8)
  np.testing.assert_array_equal(t1, t8)
  assert l1 == pytest.approx(l8, rel=1e-5)
  assert m1.any() and not m1[:, :P].any()  # something masked, never in the prompt
  np.testing.assert_array_equal(xt1[:, :P], batch["tokens"][:, :P])
  np.testing.assert_array_equal(np.where(m1, arith_task.MASK, batch["tokens"]), xt1)


@pytest.mark.parametrize("masking", MASKINGS)
def test_reversing_the_batch_reverses_the_masks(masking, scored_set):
  cfg = _sft_config(masking, scored_set, diffusion__time_sampling="example")
  exp = exp_lib.Experiment.create(cfg, mesh=_mesh(2))
  batch = _first_batch(exp)
  rev = {k: v[::-1].copy() for k, v in batch.items()}
  _, m, t, _ = _corrupt_and_loss(exp, batch)
  _, mr, tr, _ = _corrupt_and_loss(exp, rev)
  np.testing.assert_array_equal(mr, m[::-1])
  np.testing.assert_array_equal(tr, t[::-1])
  # A different step draws different masks (keys are folded with the step).
  _, m_other, _, _ = _corrupt_and_loss(exp, batch, step=4)
  assert (m_other != m).any()


def test_bucket_order_is_chosen_by_masking(scored_set):
  with np.load(scored_set) as z:
    hard, easy, rand = z["buckets"], z["buckets_easy_first"], z["buckets_random"]
  np.testing.assert_array_equal(easy, 9 - hard)
  np.testing.assert_array_equal(np.sort(rand, 1), np.sort(hard, 1))  # a permutation per response
  assert (rand != hard).any()
  got = {}
  for masking in MASKINGS:
    exp = exp_lib.Experiment.create(_sft_config(masking, scored_set), mesh=_mesh(1))
    batch = _first_batch(exp)
    ids = batch["example_id"]
    if masking == "random":
      assert "buckets" not in batch
      continue
    assert not batch["buckets"][:, :P].any()
    got[masking] = (batch["buckets"][:, P:], ids)
  for masking, ref in (("trims", hard), ("trims_easy_first", easy), ("random_buckets", rand)):
    b, ids = got[masking]
    np.testing.assert_array_equal(b, ref[ids])


def test_trims_masks_follow_the_buckets(scored_set):
  """Under uniform k, bucket j is context (p = 0.05) iff k >= j: mask rate 0.05 + 0.9 j / 8."""
  exp = exp_lib.Experiment.create(_sft_config("trims", scored_set), mesh=_mesh(1))
  batch = _first_batch(exp)
  b = batch["buckets"]
  steps = 40
  rates = np.zeros(9)
  for step in range(steps):
    _, m, _, _ = _corrupt_and_loss(exp, batch, step)
    for k in range(1, 9):
      rates[k] += m[b == k].mean() / steps
  expected = np.array([0.05 + 0.9 * j / 8 for j in range(1, 9)])
  np.testing.assert_allclose(rates[1:], expected, atol=0.1)
  assert rates[1] < rates[4] < rates[8]  # hard anchors stay visible most often


@pytest.mark.slow
@pytest.mark.parametrize("masking", ["trims", "random"])
def test_resume_gives_identical_parameters(masking, scored_set, tmp_path):
  cfg = _sft_config(masking, scored_set, diffusion__time_sampling="example")
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  trainer.train(cfg, straight)
  trainer.train(cfg, split, stop_after_steps=2)
  trainer.train(cfg, split)
  a, b = api.load(straight, use_ema=False), api.load(split, use_ema=False)
  assert a.step == b.step == 4
  for x, y in zip(jax.tree.leaves(jax.device_get(a.params)), jax.tree.leaves(jax.device_get(b.params))):
    np.testing.assert_array_equal(x, y)


def test_sft_weighting_uniform_is_masked_token_mean(scored_set):
  """S-u: mean CE over masked slots; S: (1/B) sum_b (1/t_b) sum CE / n_b (they differ)."""
  exp_u = exp_lib.Experiment.create(_sft_config("random", scored_set,
                                                trims__weighting="uniform", diffusion__normalize="token"), mesh=_mesh(1))
  exp_s = exp_lib.Experiment.create(_sft_config("random", scored_set), mesh=_mesh(1))
  assert arith_sft_standard_uniform.get_config().trims.weighting == "uniform"
  batch = _first_batch(exp_u)
  params = exp_u.init_state(0).params
  key = jax.random.key(3)
  gb = {k: jnp.asarray(v) for k, v in batch.items()}
  xt, m, t, _ = exp_u.method.corrupt(gb, key)
  logits, _ = exp_u.method.apply(params, xt, gb["positions"], gb["segment_ids"], None)
  from dlm_jax.diffusion import masked  # pylint: disable=g-import-not-at-top
  from dlm_jax.trims import loss as trims_loss  # pylint: disable=g-import-not-at-top
  ref_u, _ = trims_loss.sft_loss(logits, gb["tokens"], m, arith_task.MASK, "token")
  ref_s, _ = masked.mdlm_loss(logits, gb["tokens"], m, t, exp_s.method.schedule, gb["maskable"],
                              arith_task.MASK, "sequence")
  lu, _ = exp_u.method.train_loss(params, gb, key, train=False)
  ls, _ = exp_s.method.train_loss(params, gb, key, train=False)
  assert float(lu) == pytest.approx(float(ref_u), rel=1e-5)
  assert float(ls) == pytest.approx(float(ref_s), rel=1e-5)
  assert abs(float(lu) - float(ls)) > 1e-3


# -- teacher scoring -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("teacher") / "run")
  trainer.train(_shrink(arith_teacher.get_config(), train__num_steps=2), wd)
  return wd


def _arrays(path):
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def test_score_difficulty_resumes_with_identical_output(teacher_dir, tmp_path):
  full, cut = str(tmp_path / "full.npz"), str(tmp_path / "cut.npz")
  kw = dict(num_buckets=8, batch_size=16, save_every=16, progress=False)
  ref = score_difficulty.run(teacher_dir, "arith:seed=5,n=50", full, **kw)
  assert score_difficulty.run(teacher_dir, "arith:seed=5,n=50", cut, stop_after=20, **kw) is None
  part = sft_lib.partial_path(cut)
  with np.load(part) as z:
    assert int(z["done"]) == 32  # whole batches, saved before stopping
  assert not os.path.exists(cut)
  # A partial file from other settings is refused, naming what differs.
  with pytest.raises(score_difficulty.ScoringError, match="batch_size"):
    score_difficulty.run(teacher_dir, "arith:seed=5,n=50", cut, num_buckets=8, batch_size=8, progress=False)
  got = score_difficulty.run(teacher_dir, "arith:seed=5,n=50", cut, **kw)
  assert not os.path.exists(part)
  a, b = _arrays(full), _arrays(cut)
  assert sorted(a) == sorted(b)
  for k in a:
    if k != "meta":
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert got["bucket_mean_nll"] == ref["bucket_mean_nll"]
  # Scores are the teacher's NLL: buckets order them (bucket 1 hardest) within every response.
  nll, bk = a["nll"], a["buckets"]
  assert nll.shape == (50, R) and (nll >= 0).all() and nll.max() > 0
  for row in range(50):
    assert nll[row][bk[row] == 1].min() >= nll[row][bk[row] == 8].max()
  means = np.asarray(ref["bucket_mean_nll"])
  assert (np.diff(means) <= 0).all()
  with open(os.path.splitext(full)[0] + ".json") as f:
    assert json.load(f)["num_buckets"] == 8
  # The training pipeline reads it: prompt never maskable, example ids preserved.
  cfg = _sft_config("trims", full)
  exp = exp_lib.Experiment.create(cfg, mesh=_mesh(1))
  batch = _first_batch(exp)
  assert not batch["maskable"][:, :P].any() and batch["maskable"][:, P:].all()


def test_teacher_must_be_causal_with_the_students_tokenizer(teacher_dir):
  teacher = api.load(teacher_dir)
  score_difficulty.check_teacher(teacher, teacher_dir, task_pipeline.arith_tokenizer(), "arith")
  with pytest.raises(score_difficulty.ScoringError, match=r"differs from the student's.*--student_config=x.py"):
    score_difficulty.check_teacher(teacher, teacher_dir, tokenizers.get_tokenizer("bytes"),
                                   "--student_config=x.py")
  fake = types.SimpleNamespace(config=ml_collections.ConfigDict(dict(method="mdlm")), method=object())
  with pytest.raises(score_difficulty.ScoringError, match="causal LM"):
    score_difficulty.check_teacher(fake, "wd", None, "")


class _CharTok:
  name = "chars"
  vocab_size = 260
  pad_id, bos_id, eos_id, mask_id = 0, 1, 2, 3

  def encode(self, text):
    return [4 + ord(c) % 250 for c in text]


def test_jsonl_layout_and_errors_name_the_line(tmp_path):
  good = tmp_path / "ok.jsonl"
  good.write_text('{"prompt": "2+2?", "response": "4"}\n\n{"prompt": "hi", "response": "hello"}\n')
  data = sft_lib.jsonl_set(str(good), _CharTok(), 32, "config.data.seq_len")
  assert data.prompt.shape == (2, 5) and data.response.shape == (2, 6)
  assert data.prompt[0, 0] == 1 and data.prompt[1, 3] == 0  # BOS first, PAD after a short prompt
  assert (data.response[0, 1:] == 2).all() and data.response[1, 5] == 2  # EOS fill
  assert list(data.extra["line"]) == [1, 3]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "answer": "b"}\n')
  with pytest.raises(score_difficulty.ScoringError, match=r"bad.jsonl:2: missing field 'response'"):
    sft_lib.jsonl_set(str(bad), _CharTok(), 32, "config.data.seq_len")
  long = tmp_path / "long.jsonl"
  long.write_text('{"prompt": "a", "response": "b"}\n' * 2 + json.dumps({"prompt": "q", "response": "x" * 40}) + "\n")
  with pytest.raises(score_difficulty.ScoringError, match=r"long.jsonl:3: .*config.data.seq_len = 32"):
    sft_lib.jsonl_set(str(long), _CharTok(), 32, "config.data.seq_len")
  with pytest.raises(score_difficulty.ScoringError, match="n must be >= 1"):
    arith_task.parse_arith_spec("arith:seed=1,n=0")
