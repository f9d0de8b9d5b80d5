"""Import of the published PyTorch MDLM weights, checked against that code's own outputs; export.

Oracles: tests/fixtures/mdlm_dit (weights, inputs and outputs of the PyTorch `DIT` run by its
authors' code; its README says how they were made), and tests/fixtures/torch_ckpt (a real
Lightning checkpoint and a torch.save'd state dict written by torch, with the same tensors as
numpy next to them; `make.py` there regenerates them). No test needs torch.
"""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.diffusion import masked
from dlm_jax.models import pytorch_dit
from dlm_jax.models.transformer import rope_inv_freq
from dlm_jax.run import api
from dlm_jax.run import interop
from dlm_jax.run import torch_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A copy of ../shared/fixtures/mdlm_dit (its README.md says how the PyTorch code made it).
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "mdlm_dit")
TORCH_DIR = os.path.join(ROOT, "tests", "fixtures", "torch_ckpt")
# Max |error| / max |reference| allowed against the PyTorch outputs. We reach ~4e-7; the brief's
# 1e-5 would let exact GELU (6e-6 on this fixture) instead of the tanh form pass, 2e-6 does not.
REL_TOL = 2e-6


def wordlevel_tokenizer(path, vocab_size):
  """A tokenizer.json of `vocab_size` ids: [PAD] 0, [BOS] 1, [EOS] 2, w3 .., [MASK] = V - 1."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2,
           **{f"w{i}": i for i in range(3, vocab_size - 1)}, "[MASK]": vocab_size - 1}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[PAD]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(path))
  return f"file:{path}"


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def fixture_state_dict():
  return interop.read_safetensors(os.path.join(FIXTURE, "mdlm_dit_small.safetensors"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """The fixture's weights imported into a workdir (float32 compute, its 97-id vocabulary)."""
  tmp = tmp_path_factory.mktemp("interop")
  config = interop.default_import_config(model_length=32)
  config.data.tokenizer = wordlevel_tokenizer(tmp / "tokenizer.json", 97)
  config.train.global_batch_size = 8
  wd = str(tmp / "run")
  summary = interop.import_mdlm(os.path.join(FIXTURE, "mdlm_dit_small.safetensors"), wd,
                                num_heads=4, config=config, log=lambda *_: None)
  return wd, summary, tmp


def test_imported_run_matches_the_pytorch_network(imported):
  """dlm_jax.load of the imported workdir: raw logits at the fixture's sigma and at sigma = 0
  (also what sigma=None feeds), and SUBS log-probabilities, equal the PyTorch outputs."""
  wd, summary, _ = imported
  meta = json.load(open(os.path.join(FIXTURE, "mdlm_dit_small.json")))
  assert (summary["num_layers"], summary["d_model"], summary["num_heads"], summary["cond_dim"],
          summary["vocab_size"]) == (meta["n_blocks"], meta["hidden_size"], meta["n_heads"],
                                     meta["cond_dim"], meta["vocab_size"])
  io = np.load(os.path.join(FIXTURE, "mdlm_dit_small_io.npz"))
  # The workdir carries its tokenizer, as a trained run's does: moving the source file away
  # does not matter to load.
  assert os.path.exists(os.path.join(wd, "tokenizer", "tokenizer_info.json"))
  os.rename(os.path.join(os.path.dirname(wd), "tokenizer.json"),
            os.path.join(os.path.dirname(wd), "tokenizer.json.moved"))
  run = api.load(wd)
  assert run.config.model.adaln_always and not run.config.model.time_conditioning
  logits = run.logits(io["xt"], io["sigma"])
  assert logits.shape == io["logits"].shape and logits.dtype == np.float32
  assert rel_err(logits, io["logits"]) < REL_TOL
  assert rel_err(run.logits(io["xt"], 0.0), io["logits_sigma0"]) < REL_TOL
  logits0 = run.logits(io["xt"])  # time conditioning off: the network sees sigma = 0
  assert rel_err(logits0, io["logits_sigma0"]) < REL_TOL
  # sigma reaches the network: the two references differ by far more than the tolerance
  assert rel_err(io["logits_sigma0"], io["logits"]) > 100 * REL_TOL

  mask = meta["mask_index"]
  assert run.tokenizer.mask_id == mask
  ours = np.asarray(masked.subs_log_probs(jnp.asarray(logits0), mask, jnp.asarray(io["xt"])))
  ref = io["subs_logprobs"]
  very_neg = ref < -5e5  # they write -1e6 where we write -inf (probability zero either way)
  assert np.array_equal(very_neg, ours < -5e5) and np.all(np.isneginf(ours[very_neg]))
  assert rel_err(ours[~very_neg], ref[~very_neg]) < REL_TOL
  assert np.allclose(ours[~very_neg], ref[~very_neg], rtol=1e-5, atol=1e-6)


def test_export_after_import_gives_back_the_same_tensors(imported):
  """The PyTorch layout of the export is the fixture file bit for bit (keys, dtypes, shapes,
  bytes), the buffer included; re-importing the export gives the same parameters."""
  wd, _, tmp = imported
  out = str(tmp / "export")
  summary = interop.export(wd, out, log=lambda *_: None)
  assert summary["pytorch"] == os.path.join(out, "pytorch")
  want = fixture_state_dict()
  got = interop.read_safetensors(os.path.join(out, "pytorch", "model.safetensors"))
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    assert got[k].tobytes() == want[k].tobytes(), k
  hf = json.load(open(os.path.join(out, "pytorch", "config.json")))
  assert (hf["hidden_dim"], hf["n_blocks"], hf["n_heads"], hf["cond_dim"], hf["vocab_size"],
          hf["mask_index"], hf["time_conditioning"]) == (64, 2, 4, 32, 97, 96, False)
  # our own layout: every parameter under its tree path, and the run's config
  ours = interop.read_safetensors(os.path.join(out, "model.safetensors"))
  run = api.load(wd)
  flat = interop.flatten(run.params)
  assert sorted(ours) == sorted(flat) and "block_0/qkv/kernel" in ours
  assert all(np.array_equal(ours[k], flat[k]) for k in flat)
  assert json.load(open(os.path.join(out, "config.json")))["model"]["ln_eps"] == 1e-5
  # the exported folder is a Hugging Face folder the importer reads (n_heads from its config)
  sizes = pytorch_dit.infer_sizes(interop.read_source(os.path.join(out, "pytorch")).state_dict,
                                  given=interop._hf_given(hf))  # pylint: disable=protected-access
  assert sizes.num_heads == 4
  with pytest.raises(interop.InteropError, match="already holds an export"):
    interop.export(wd, out, log=lambda *_: None)


def test_export_of_a_native_run_has_no_pytorch_layout(tmp_path):
  """A dlm-jax network (no adaLN at t = 0, LayerNorm without scale, ...) is exported in our
  layout only, with the reason; our layout holds every parameter under its tree path."""
  from tests.tiny import tiny_config  # pylint: disable=g-import-not-at-top
  from dlm_jax.run import experiment as exp_lib  # pylint: disable=g-import-not-at-top
  exp = exp_lib.Experiment.create(tiny_config())
  state = exp.init_state(0)
  wd = str(tmp_path / "run")
  interop.write_workdir(exp, wd, state.params, state.ema_params, log=lambda *_: None)
  s = interop.export(wd, str(tmp_path / "out"), use_ema=False, log=lambda *_: None)
  assert s["pytorch"].startswith("not the published MDLM network") and "adaln_always" in s["pytorch"]
  assert not os.path.exists(tmp_path / "out" / "pytorch")
  got = interop.read_safetensors(str(tmp_path / "out" / "model.safetensors"))
  want = interop.flatten(state.params)
  assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
  # run.logits of a network without a time input: [B, L, V]; a sigma is refused, not ignored
  run = api.load(wd, use_ema=False)
  tokens = np.arange(10, dtype=np.int32)
  logits = run.logits(tokens)
  assert logits.shape == (1, 10, run.tokenizer.vocab_size)
  want_logits = run.method.logits_fn(run.params)(jnp.asarray(tokens[None]))
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no time input"):
    run.logits(tokens, 0.5)
  with pytest.raises(ValueError, match="must lie in"):
    run.logits([run.tokenizer.vocab_size])


def test_mapping_round_trip_and_published_order():
  sd = fixture_state_dict()
  meta = json.load(open(os.path.join(FIXTURE, "mdlm_dit_small.json")))
  sizes = pytorch_dit.infer_sizes(sd)  # n_heads from the rotary buffer
  assert sizes.num_heads == 4
  back = pytorch_dit.to_state_dict(pytorch_dit.to_params(sd, sizes), sizes)
  assert list(back) == list(meta["keys"])  # the published state_dict order
  assert all(back[k].tobytes() == sd[k].tobytes() for k in sd)


def test_rotary_frequencies_match_torch():
  """'reciprocal' is torch's 1 / 10000^(2i/Dh) bit for bit for the published head sizes (the
  old 'neg_power' formula is not); for Dh = 96 the two differ by at most an ulp."""
  e = np.load(os.path.join(TORCH_DIR, "expected.npz"))
  for dh in (16, 32, 64, 128):
    assert np.asarray(rope_inv_freq(dh, 10000.0, "reciprocal")).tobytes() == e[
        f"inv_freq/{dh}"].tobytes(), dh
  assert np.asarray(rope_inv_freq(64, 10000.0, "neg_power")).tobytes() != e["inv_freq/64"].tobytes()
  ours96 = np.asarray(rope_inv_freq(96, 10000.0, "reciprocal")).view(np.int32)
  assert np.abs(ours96 - e["inv_freq/96"].view(np.int32)).max() <= 1


# -- bad input -------------------------------------------------------------------------------
def _broken(case):
  sd = {k: np.asarray(v) for k, v in fixture_state_dict().items()}
  if case == "shape":
    sd["backbone.blocks.1.mlp.0.bias"] = sd["backbone.blocks.1.mlp.0.bias"][:-1]
  elif case == "missing":
    del sd["backbone.blocks.0.attn_out.weight"]
  elif case == "extra":
    sd["backbone.blocks.1.attn_qkv.bias"] = np.zeros(192, np.float32)
  elif case == "block":
    sd = {k: v for k, v in sd.items() if ".blocks.0." not in k}
  elif case == "no_buffer":
    del sd["backbone.rotary_emb.inv_freq"]
  return sd


@pytest.mark.parametrize("case,heads,given,words", [
    ("shape", 4, None, ["backbone.blocks.1.mlp.0.bias", "(255,)", "expected (256,)"]),
    ("missing", 4, None, ["backbone.blocks.0.attn_out.weight is missing", "(64, 64)"]),
    ("extra", 4, None, ["backbone.blocks.1.attn_qkv.bias", "not part of"]),
    ("block", 4, None, ["backbone.blocks.0", "missing"]),
    ("ok", 8, None, ["backbone.rotary_emb.inv_freq", "expected (4,)", "n_heads=8"]),
    ("no_buffer", None, None, ["n_heads", "--n_heads"]),
    ("no_buffer", 5, None, ["n_heads=5", "hidden 64"]),
    ("ok", 4, dict(d_model=128), ["backbone.vocab_embed.embedding", "d_model=64", "128"]),
])
def test_a_checkpoint_that_does_not_fit_names_the_first_failing_key(case, heads, given, words):
  with pytest.raises(pytorch_dit.StateDictError) as e:
    pytorch_dit.infer_sizes(_broken(case), heads, given)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_import_refuses_a_tokenizer_of_another_size_and_a_used_workdir(imported, tmp_path):
  config = interop.default_import_config(model_length=32)
  config.data.tokenizer = "bytes"  # 260 ids, the checkpoint has 97
  with pytest.raises(pytorch_dit.StateDictError, match="vocab_embed.embedding has 97 rows"):
    interop.import_mdlm(os.path.join(FIXTURE, "mdlm_dit_small.safetensors"),
                        str(tmp_path / "w"), num_heads=4, config=config, log=lambda *_: None)
  with pytest.raises(interop.InteropError, match="already holds checkpoints"):
    interop.import_mdlm(os.path.join(FIXTURE, "mdlm_dit_small.safetensors"), imported[0],
                        num_heads=4, log=lambda *_: None)
  with pytest.raises(interop.InteropError, match="only a Lightning .ckpt"):
    interop.import_mdlm(os.path.join(FIXTURE, "mdlm_dit_small.safetensors"),
                        str(tmp_path / "w2"), num_heads=4, use_ema=True, log=lambda *_: None)


# -- torch.save files without torch ------------------------------------------------------------
def test_lightning_checkpoint_is_read_without_torch():
  ckpt = torch_files.load(os.path.join(TORCH_DIR, "tiny.ckpt"))
  e = np.load(os.path.join(TORCH_DIR, "expected.npz"))
  sd = ckpt["state_dict"]
  assert len(sd) == 31 and all(k.startswith("backbone.") for k in sd)
  for k, v in sd.items():
    assert v.dtype == e[f"sd/{k}"].dtype and np.array_equal(v, e[f"sd/{k}"]), k
  shadow = ckpt["ema"]["shadow_params"]
  assert len(shadow) == 30 and all(np.array_equal(t, e[f"ema/{i}"]) for i, t in enumerate(shadow))
  # the pickled omegaconf config and tokenizer come back inert, their values readable
  assert isinstance(ckpt["hyper_parameters"]["tokenizer"], torch_files.Opaque)
  given = interop._lightning_given(ckpt)  # pylint: disable=protected-access
  assert given == dict(num_heads=2, model_length=16, time_conditioning=False)


def test_torch_save_layouts_are_read_exactly():
  """Transposed and offset views of a shared storage, bf16, int64 and 0-d tensors."""
  sd = torch_files.load(os.path.join(TORCH_DIR, "tiny_state_dict.bin"))
  e = np.load(os.path.join(TORCH_DIR, "expected.npz"))
  for k in ("transposed", "view", "int64", "scalar"):
    assert sd[f"extra.{k}"].dtype == e[f"extra/{k}"].dtype
    assert np.array_equal(sd[f"extra.{k}"], e[f"extra/{k}"]), k
  assert str(sd["extra.bf16"].dtype) == "bfloat16"
  assert np.array_equal(sd["extra.bf16"].astype(np.float32), e["extra/bf16_as_f32"])


def test_lightning_import_takes_the_ema_weights_when_asked(tmp_path):
  """--ema pairs the bare shadow_params list with the parameter names in order: the fixture's
  EMA tensors are 0.5 * p + 0.25 of the raw ones, name by name."""
  config = interop.default_import_config(model_length=16)
  config.data.tokenizer = wordlevel_tokenizer(tmp_path / "tok.json", 24)
  config.train.global_batch_size = 8
  wd = str(tmp_path / "run")
  path = os.path.join(TORCH_DIR, "tiny.ckpt")
  s = interop.import_mdlm(path, wd, use_ema=True, config=config, log=lambda *_: None)
  assert (s["kind"], s["weights"], s["num_heads"], s["d_model"]) == ("lightning", "ema", 2, 8)
  raw = torch_files.load(path)["state_dict"]
  sizes = pytorch_dit.infer_sizes(raw)
  ema_run = pytorch_dit.to_state_dict(api.load(wd).params, sizes)
  raw_run = pytorch_dit.to_state_dict(api.load(wd, use_ema=False).params, sizes)
  for k, v in raw.items():
    assert np.array_equal(raw_run[k], v), k
    if not k.endswith("inv_freq"):
      assert np.array_equal(ema_run[k], v * np.float32(0.5) + np.float32(0.25)), k
  # the workdir holds what a run's does (the data position included): training resumes in it
  from dlm_jax.run import trainer  # pylint: disable=g-import-not-at-top
  cfg, _ = api.read_run_config(wd)
  cfg.train.num_steps, cfg.train.print_batch, cfg.data.prefetch = 1, False, 0
  assert trainer.train(cfg, wd)["step"] == 1


def _zip_pickle(path, obj_bytes):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", obj_bytes)
    z.writestr("archive/version", "3\n")


class _Evil:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.system, (f"touch {self.target}",))


def test_a_pickle_runs_no_code(tmp_path):
  """A pickled call of os.system (as a malicious .ckpt could hold) comes back inert."""
  target = tmp_path / "pwned"
  path = tmp_path / "evil.ckpt"
  _zip_pickle(path, pickle.dumps({"state_dict": {}, "x": _Evil(target)}, protocol=2))
  obj = torch_files.load(str(path))
  assert isinstance(obj["x"], torch_files.Opaque) and not target.exists()
  legacy = tmp_path / "legacy.pt"
  legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
  with pytest.raises(torch_files.TorchFileError, match="legacy"):
    torch_files.load(str(legacy))
  text = tmp_path / "notes.txt"
  text.write_text("not a checkpoint")
  with pytest.raises(interop.InteropError, match="not a torch.save"):
    interop.read_source(str(text))


def test_torch_round_trip_when_torch_is_installed(tmp_path):
  torch = pytest.importorskip("torch")
  t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  torch.save({"a": t, "b": t.t(), "c": t[1:, 2:]}, tmp_path / "x.bin")
  got = torch_files.load(str(tmp_path / "x.bin"))
  assert np.array_equal(got["a"], t.numpy()) and np.array_equal(got["b"], t.t().numpy())
  assert np.array_equal(got["c"], t[1:, 2:].numpy())


# -- the commands, as a user runs them ---------------------------------------------------------
def _run(args, timeout=600):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


RECIPE = ["--config=configs/mdlm_tiny.py", "--config.data.tokenizer=gpt2",
          "--config.data.seq_len=32", "--config.model.max_len=64", "--config.model.dtype=float32",
          "--config.train.global_batch_size=8", "--config.train.eval_batches=1",
          "--config.data.prefetch=0", "--config.train.print_batch=false"]


@pytest.mark.slow
def test_import_sample_evaluate_finetune_export_commands(tmp_path):
  """A Hugging Face folder of a (random, tiny) published-layout model with GPT-2's vocabulary
  through every command: import, sample, evaluate, train --config.train.init_from, export."""
  rng = np.random.default_rng(0)
  sizes = pytorch_dit.DitSizes(vocab_size=50258, d_model=16, num_layers=1, num_heads=2,
                               cond_dim=8, mlp_ratio=4)
  sd = {pytorch_dit.PREFIX + k: (rng.normal(size=s) * 0.1).astype(np.float32)
        for k, s in pytorch_dit.expected_shapes(sizes, with_inv_freq=False).items()}
  hf = tmp_path / "hf"
  hf.mkdir()
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(sd, str(hf / "model.safetensors"))
  (hf / "config.json").write_text(json.dumps(dict(
      hidden_dim=16, n_blocks=1, n_heads=2, cond_dim=8, vocab_size=50258, model_length=32,
      time_conditioning=False, dropout=0.1)))
  wd = str(tmp_path / "imported")
  r = _run(["dlm_jax.import_mdlm", f"--checkpoint={hf}", f"--workdir={wd}", *RECIPE])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Imported" in r.stdout and "mask id 50257" in r.stdout

  r = _run(["dlm_jax.sample", f"--workdir={wd}", "--num_samples=2", "--set", "num_steps=4",
            "--set", "batch_size=2"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert len(open(os.path.join(wd, "samples.jsonl")).readlines()) == 2
  r = _run(["dlm_jax.evaluate", f"--workdir={wd}", "--num_batches=1", "--num_t=1"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.load(open(os.path.join(wd, "eval_step0.json")))["nelbo_nats_per_token"] > 0

  dit = ["--config.model.num_layers=1", "--config.model.d_model=16", "--config.model.num_heads=2",
         "--config.model.cond_dim=8", "--config.model.adaln_always=true",
         "--config.model.ln_scale_with_adaln=true", "--config.model.ln_eps=1e-5",
         "--config.model.ln_fast_variance=false", "--config.model.rope_freqs=reciprocal"]
  ft = str(tmp_path / "ft")
  r = _run(["dlm_jax.train", f"--workdir={ft}", *RECIPE, *dit, "--config.train.num_steps=1",
            f"--config.train.init_from={wd}"])
  assert r.returncode == 0, r.stderr[-3000:]
  r = _run(["dlm_jax.train", f"--workdir={tmp_path / 'ft2'}", *RECIPE, *dit[:-1],
            "--config.train.num_steps=1", f"--config.train.init_from={wd}"])
  assert r.returncode == 2 and "config.model.rope_freqs='neg_power'" in r.stderr, r.stderr[-2000:]

  out = tmp_path / "export"
  r = _run(["dlm_jax.export", f"--workdir={wd}", f"--out={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  back = interop.read_safetensors(str(out / "pytorch" / "model.safetensors"))
  assert all(back[k].tobytes() == v.tobytes() for k, v in sd.items())
  assert set(back) == set(sd) | {pytorch_dit.PREFIX + pytorch_dit.INV_FREQ}

  r = _run(["dlm_jax.import_mdlm", f"--checkpoint={hf}", f"--workdir={tmp_path / 'bad'}",
            "--n_heads=4"])
  assert r.returncode == 2 and r.stderr.startswith("ERROR:"), r.stderr[-2000:]
  assert "n_heads" in r.stderr
