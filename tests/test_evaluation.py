"""Value tests of the measurements every reported figure comes from: gen-PPL (evaluation/gen_ppl.py)
and task accuracy, valid traces, TPF and commits per pass (evaluation/task_accuracy.py), against
hand-computed cases."""

import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import metrics as metrics_lib
from dlm_jax import methods
from dlm_jax.data.tasks import arith
from dlm_jax.data.tokenizers import ByteTokenizer
from dlm_jax.evaluation import gen_ppl as gen_ppl_lib
from dlm_jax.evaluation import task_accuracy
from dlm_jax.run import api
from tests.tiny import tiny_config


# -- gen-PPL ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def judge():
  """An AR judge whose next-token distribution is fixed by hand: the head's kernel is zero and
  its bias puts weight 2 on 'a' and 1 on every other id but [MASK] (259 ids, Z = 260), so
  p('a') = 1/130 and p(x) = 1/260 for any other byte, whatever the context."""
  cfg = tiny_config(method="ar")
  tok = ByteTokenizer()
  method = methods.make_method(cfg, tok)
  params = jax.device_get(nn.unbox(method.init_params(jax.random.key(0))))
  assert not cfg.model.tie_embeddings
  params["head"]["kernel"] = np.zeros_like(params["head"]["kernel"])
  bias = np.zeros_like(params["head"]["bias"])
  bias[tok.encode("a")[0]] = math.log(2.0)
  params["head"]["bias"] = bias
  return types.SimpleNamespace(config=cfg, tokenizer=tok, method=method, params=params,
                               mesh=api._mesh_over(jax.devices()[:1]))  # pylint: disable=protected-access


def test_judge_nll_and_gen_ppl_by_hand(judge):
  long = "a" * 40  # truncated to seq_len - 1 = 31 scored tokens after [BOS]
  texts = ["ab", "a", long]
  nll, cnt = gen_ppl_lib.judge_nll(judge, texts, batch_size=2)  # two batches, the last padded
  np.testing.assert_array_equal(cnt, [2, 1, 31])
  np.testing.assert_allclose(nll, [math.log(130) + math.log(260), math.log(130),
                                   31 * math.log(130)], rtol=1e-5)
  res = gen_ppl_lib.gen_ppl(judge, texts)
  total = 2 * math.log(130) + math.log(260) + 31 * math.log(130)
  assert res["judged_tokens"] == 34 and res["num_samples"] == 3
  assert res["gen_nll_per_token"] == pytest.approx(total / 34, rel=1e-5)
  assert res["gen_ppl"] == pytest.approx(math.exp(total / 34), rel=1e-5)
  # Mean unigram entropy of the samples: "ab" ln 2, the others 0.
  assert res["unigram_entropy"] == pytest.approx(math.log(2) / 3, rel=1e-9)
  # Three 'a's and a 'b' alone: gen-PPL = (130^3 * 260)^(1/4).
  assert gen_ppl_lib.gen_ppl(judge, ["aaab"])["gen_ppl"] == pytest.approx(
      (130**3 * 260) ** 0.25, rel=1e-5)


def test_unigram_entropy_by_hand():
  assert gen_ppl_lib.unigram_entropy([]) == 0.0
  assert gen_ppl_lib.unigram_entropy([7, 7, 7]) == 0.0
  assert gen_ppl_lib.unigram_entropy([1, 2, 1, 2]) == pytest.approx(math.log(2))
  # counts (2, 1, 1): -(1/2 ln 1/2 + 2 * 1/4 ln 1/4) = 1.5 ln 2
  assert gen_ppl_lib.unigram_entropy([5, 5, 6, 9]) == pytest.approx(1.5 * math.log(2))


def test_gen_ppl_refuses_a_judge_that_is_not_autoregressive(judge):
  cfg = tiny_config()
  # a masked-diffusion run (the check reads the method's family, as the decoders do)
  fake = types.SimpleNamespace(**dict(vars(judge), config=cfg,
                                      method=types.SimpleNamespace(family="masked")))
  with pytest.raises(ValueError, match="autoregressive"):
    gen_ppl_lib.judge_nll(fake, ["x"])


# -- task accuracy, valid traces, TPF --------------------------------------------------------------
def test_score_point_by_hand():
  """Four ARITH-CHAIN prompts decoded into 24 slots (the response is 25 tokens; its last one is
  always EOS fill): row 0 and 1 the reference responses, row 2 a wrong middle digit but the right
  answer, row 3 the wrong answer. NFE 3, 6, 12, 24; row r commits slot j at pass j mod NFE_r."""
  task = arith.ArithChain()
  assert task.response_len == 25
  ex = task.generate(5, 4)
  resp, k = ex["response"], ex["num_steps"]
  gen = resp[:, :24].copy()
  gen[2, 5] = (gen[2, 5] + 1) % 10  # tens digit of r_1: the trace breaks, the answer stands
  arrow = int(np.flatnonzero(gen[3] == arith.ARROW)[0])
  gen[3, arrow + 1] = (gen[3, arrow + 1] + 1) % 10  # the answer's tens digit
  nfe = np.array([3, 6, 12, 24])
  commit_step = np.stack([np.arange(24) % n for n in nfe])
  dec = dict(generated=gen, nfe=nfe, commit_step=commit_step)
  pt = task_accuracy.score_point(task, ex["prompt"], ex["answer"], dec, arith.EOS)

  assert pt["n"] == 4 and pt["correct"] == 3 and pt["accuracy"] == 75.0
  # Wilson 95% for 3 of 4: centre (0.75 + z^2/8) / (1 + z^2/4), half-width
  # z sqrt(0.75 * 0.25 / 4 + z^2 / 64) / (1 + z^2/4) with z = 1.96: (30.06%, 95.44%).
  np.testing.assert_allclose(pt["acc_ci95"], [30.064, 95.442], atol=2e-3)
  assert pt["valid_trace_rate"] == 50.0
  assert pt["tpf_gen"] == pytest.approx(96 / 45)
  content = np.where(k == 3, 24, 7 * k + 3)  # EOS follows '>' r_k (none inside 24 slots if k = 3)
  assert pt["content_len_mean"] == pytest.approx(content.mean())
  assert pt["tpf_content"] == pytest.approx(content.sum() / 45)
  assert pt["nfe_mean"] == pytest.approx(11.25)
  # Pass p commits 24 / NFE_r slots in every row with NFE_r > p, averaged over the 4 rows.
  want = [sum(24 / n for n in nfe if n > p) / 4 for p in range(24)]
  np.testing.assert_allclose(pt["commits_per_pass"], want)
  assert sum(pt["commits_per_pass"]) == pytest.approx(24.0)


def test_score_point_fills_a_short_decode_with_eos_and_reads_generated_length():
  """A decode of 16 slots for a 25-token response: the rest is EOS fill, so a one-step example
  (10 tokens + EOS) is still exactly right, and TPF counts the 16 generated slots."""
  task = arith.ArithChain()
  ex = task.generate(0, 50)
  one = np.flatnonzero(ex["num_steps"] == 1)[:2]
  gen = ex["response"][one, :16]
  dec = dict(generated=gen, nfe=np.array([4, 4]), commit_step=np.tile(np.arange(16) // 4, (2, 1)))
  pt = task_accuracy.score_point(task, ex["prompt"][one], ex["answer"][one], dec, arith.EOS)
  assert pt["accuracy"] == 100.0 and pt["valid_trace_rate"] == 100.0
  assert pt["tpf_gen"] == pytest.approx(4.0) and pt["tpf_content"] == pytest.approx(10 / 4)
  np.testing.assert_allclose(pt["commits_per_pass"], [4, 4, 4, 4])


def test_aup_of_points_reads_the_named_tpf():
  pts = [dict(tpf_gen=1.0, tpf_content=0.5, accuracy=50.0),
         dict(tpf_gen=2.0, tpf_content=1.0, accuracy=50.0)]
  # Equal accuracies at y_max: AUP = rho_1 y_1 + (rho_2 - rho_1) y.
  assert task_accuracy.aup_of(pts, 50.0) == pytest.approx(100.0)
  assert task_accuracy.aup_of(pts, 50.0, "tpf_content") == pytest.approx(50.0)


def test_wilson_and_tpf_definitions():
  lo, hi = metrics_lib.wilson_interval(3, 4)
  assert (lo, hi) == (pytest.approx(0.300636, abs=1e-5), pytest.approx(0.954414, abs=1e-5))
  # TPF is a ratio of sums, not a mean of ratios: (8 + 8) / (2 + 14) = 1, not (4 + 4/7) / 2.
  assert metrics_lib.tokens_per_forward(np.array([8, 8]), np.array([2, 14])) == pytest.approx(1.0)
  assert list(metrics_lib.content_length(jnp.array([[1, 2, 2], [2, 1, 1]]), 2)) == [1, 0]
