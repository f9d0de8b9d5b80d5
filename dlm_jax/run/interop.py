"""Checkpoints that travel: import the published PyTorch MDLM weights into a workdir, export ours.

  import_mdlm("mdlm-owt/", "workdirs/mdlm_owt")            # a Hugging Face folder
  import_mdlm("last.ckpt", "workdirs/mine", use_ema=True)  # a Lightning checkpoint's EMA weights
  export("workdirs/mine", "exported/")                     # safetensors + config.json (+ pytorch/)

An imported workdir is written the way training writes one (an `Experiment` and the same
`Checkpointer`: train state, config, metadata, config.json), so `dlm_jax.load`, `sample`,
`evaluate` and `train --config.train.init_from` use it like any other. The network is our one
transformer with the published network's options (`models.pytorch_dit.DIT_MODEL_OPTIONS`); the
tensor mapping is `models.pytorch_dit`. Nothing here needs torch: safetensors files are read with
the `safetensors` package, torch.save files (.ckpt, .bin) with `run.torch_files`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm_jax import config as config_lib
from dlm_jax import parallel
from dlm_jax.models import pytorch_dit
from dlm_jax.run import api
from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax.run import experiment as exp_lib
from dlm_jax.run import torch_files
from dlm_jax.run import trainer

StateDictError = pytorch_dit.StateDictError
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class InteropError(ValueError):
  """A checkpoint or workdir that cannot be imported or exported; the message says what to fix."""


# -- reading ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Source:
  """What a checkpoint file or folder holds, as numpy arrays by published name."""
  path: str
  kind: str                           # safetensors | huggingface | lightning | torch
  state_dict: dict[str, np.ndarray]   # the raw (last-step) weights
  ema: list[np.ndarray] | None        # a Lightning checkpoint's ema['shadow_params'], if any
  given: dict[str, Any]               # sizes and settings stated by a config next to the weights


def _safetensors():
  try:
    from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise InteropError("Reading and writing safetensors files needs the `safetensors` package: "
                       "pip install 'dlm-jax[interop]' (or pip install safetensors).") from e
  return st


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a .safetensors file, in the file's order."""
  try:
    return dict(_safetensors().load_file(path))
  except InteropError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # a damaged or unsupported file
    raise InteropError(f"{path} could not be read as safetensors ({type(e).__name__}: {e}).") from e


def plain(obj: Any) -> Any:
  """Python values from an unpickled omegaconf config (its objects come back `Opaque`)."""
  if isinstance(obj, torch_files.Opaque):
    state = obj.state if isinstance(obj.state, dict) else {}
    if "_content" in state:
      return plain(state["_content"])
    if "_val" in state:
      return plain(state["_val"])
    return obj
  if isinstance(obj, dict):
    return {k: plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [plain(v) for v in obj]
  return obj


def _hf_given(cfg: dict[str, Any]) -> dict[str, Any]:
  """Sizes of a Hugging Face MDLM config.json (kuleshov-group/mdlm-owt's field names)."""
  names = dict(hidden_dim="d_model", n_blocks="num_layers", n_heads="num_heads",
               cond_dim="cond_dim", vocab_size="vocab_size", model_length="model_length",
               time_conditioning="time_conditioning", dropout="dropout")
  return {ours: cfg[theirs] for theirs, ours in names.items() if theirs in cfg}


def _lightning_given(ckpt: dict[str, Any]) -> dict[str, Any]:
  """n_heads, length and time conditioning from a Lightning checkpoint's hyper_parameters."""
  try:
    cfg = plain(ckpt.get("hyper_parameters", {}).get("config"))
  except Exception:  # pylint: disable=broad-except
    return {}
  if not isinstance(cfg, dict):
    return {}
  model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
  out = {}
  for theirs, ours in (("n_heads", "num_heads"), ("length", "model_length"),
                       ("dropout", "dropout")):
    if isinstance(model.get(theirs), (int, float)) and not isinstance(model.get(theirs), bool):
      out[ours] = model[theirs]
  if isinstance(cfg.get("time_conditioning"), bool):
    out["time_conditioning"] = cfg["time_conditioning"]
  return out


def _arrays(obj: Any, what: str) -> dict[str, np.ndarray]:
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise InteropError(f"{what} is not a mapping of names to tensors.")
  return dict(obj)


def read_source(path: str) -> Source:
  """Reads a .safetensors file, a torch.save file (.ckpt, .bin, ...) or a Hugging Face folder."""
  if not os.path.exists(path):
    raise InteropError(f"--checkpoint {path!r} does not exist.")
  if os.path.isdir(path):
    cfg_path = os.path.join(path, "config.json")
    given = {}
    if os.path.exists(cfg_path):
      with open(cfg_path, encoding="utf-8") as f:
        given = _hf_given(json.load(f))
    for name in ("model.safetensors", "pytorch_model.bin"):
      weights = os.path.join(path, name)
      if os.path.exists(weights):
        src = read_source(weights)
        return dataclasses.replace(src, path=path, kind="huggingface",
                                   given={**src.given, **given})
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
      with open(os.path.join(path, "model.safetensors.index.json"), encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      sd = {}
      for shard in shards:
        sd.update(read_safetensors(os.path.join(path, shard)))
      return Source(path, "huggingface", sd, None, given)
    raise InteropError(f"{path} is a folder without model.safetensors or pytorch_model.bin; give "
                       "the weights file itself or a Hugging Face model folder.")
  if path.endswith(".safetensors"):
    return Source(path, "safetensors", read_safetensors(path), None, {})
  try:
    obj = torch_files.load(path)
  except torch_files.TorchFileError as e:
    hint = "" if path.endswith(TORCH_SUFFIXES) else (
        " Expected a .safetensors file, a torch.save file (.ckpt, .bin) or a Hugging Face folder.")
    raise InteropError(f"{e}{hint}") from e
  if isinstance(obj, dict) and "state_dict" in obj:
    sd = _arrays(obj["state_dict"], f"{path}: 'state_dict'")
    ema = obj.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    return Source(path, "lightning", sd, list(shadow) if shadow is not None else None,
                  _lightning_given(obj))
  return Source(path, "torch", _arrays(obj, path), None, {})


# -- import ----------------------------------------------------------------------------------
def default_import_config(model_length: int = 1024) -> ml_collections.ConfigDict:
  """The schema with the published MDLM's method, tokenizer, length and noise process.

  Data: the embedded corpus (evaluation works anywhere). The batch, which `evaluate` also uses,
  is 8 (at L = 1024 and V = 50258 the logits of 512 rows would take 100 GB); the other training
  settings are the schema's (the paper's). Fine-tune with a recipe (configs/mdlm_owt_dit.py).
  """
  c = config_lib.get_schema()
  c.method = "mdlm"
  c.data.tokenizer = "gpt2"       # GPT-2 + [MASK] = 50257: vocab 50258, as mdlm-owt
  c.data.seq_len = int(model_length)
  c.train.global_batch_size = 8
  c.model.dropout = 0.1
  c.diffusion.schedule = "loglinear"
  c.diffusion.eps = 1e-3          # their LogLinearNoise: move chance (1 - 1e-3) t
  return c


def apply_dit(config: ml_collections.ConfigDict, sizes: pytorch_dit.DitSizes) -> None:
  """Sets config.model to the published network of these sizes (in place)."""
  for k, v in sizes.model_fields().items():
    config.model[k] = v
  for k, v in pytorch_dit.DIT_MODEL_OPTIONS.items():
    if k in config.model:
      config.model[k] = v
  config.model.time_conditioning = False
  config.model.max_len = max(int(config.model.max_len), int(config.data.seq_len))


def _float32(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def _has_checkpoints(workdir: str) -> bool:
  d = ckpt_lib.checkpoint_dir(workdir)
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def write_workdir(exp: exp_lib.Experiment, workdir: str, params: Any, ema_params: Any | None,
                  step: int = 0, extra_meta: dict[str, Any] | None = None, log=print) -> None:
  """Saves a train state holding `params` (and EMA) as a training run's checkpoint of `step`.

  The optimizer state is fresh (`tx.init`), the data iterator at its start. Goes through the
  trainer's Checkpointer and config.json writer, so the workdir carries what a training run's
  does.
  """
  abstract = exp.abstract_state()
  want = ckpt_lib.tree_signature(abstract.params)
  got = ckpt_lib.tree_signature(params)
  diffs = ckpt_lib.describe_mismatch(got, want)
  if diffs:  # the mapping and the model disagree: a bug here, not the user's input
    raise InteropError("The imported parameters do not fit the model: " + "; ".join(diffs))
  shardings = exp.state_shardings()
  params = jax.device_put(jax.tree.map(jnp.asarray, params), shardings.params)
  ema = None
  if abstract.ema_params is not None:
    ema = jax.device_put(jax.tree.map(jnp.asarray, ema_params if ema_params is not None
                                      else params), shardings.ema_params)
  init_opt = jax.jit(exp.tx.init, out_shardings=shardings.opt_state)
  state = exp_lib.TrainState(step=jax.device_put(jnp.asarray(step, jnp.int32), shardings.step),
                             params=params, ema_params=ema,
                             opt_state=parallel.in_sharding_context(init_opt, exp.mesh)(params))
  # The data iterator's start position, as a run saves it, so that `train` can resume here too.
  try:
    data_it = trainer.PrefetchIterator(exp_lib.make_train_iterator(exp.config, exp.tokenizer),
                                       exp.mesh, size=0)
  except Exception as e:  # pylint: disable=broad-except  # e.g. a corpus that is not here
    data_it = None
    log(f"  (the recipe's training data cannot be opened here: {type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}; train from this workdir with "
        f"--config.train.init_from={workdir} in a new --workdir rather than resuming in it)")
  ckpt = ckpt_lib.Checkpointer(workdir, keep=exp.config.train.keep_ckpts, async_save=False)
  try:
    meta = dict(exp.checkpoint_meta(), step=step, **(extra_meta or {}))
    ckpt.save(step, state, exp.config, meta, data_it, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
    if data_it is not None:
      data_it.close()
  # pylint: disable-next=protected-access  # the trainer's own writer: the same files as a run
  trainer._write_config_json(exp.config, workdir)
  exp_lib.save_run_tokenizer(workdir, exp.tokenizer)  # a run carries its tokenizer files


def import_mdlm(checkpoint: str, workdir: str, *, num_heads: int | None = None,
                use_ema: bool = False, config: ml_collections.ConfigDict | None = None,
                devices: Sequence[jax.Device] | None = None, log=print) -> dict[str, Any]:
  """Imports the published PyTorch MDLM weights into a new workdir.

  Args:
    checkpoint: a .safetensors file or a Hugging Face folder (model.safetensors + config.json)
      with `backbone.*` keys, a Lightning .ckpt of the published code, or a torch.save'd state
      dict.
    workdir: where to write the run (must hold no checkpoint yet).
    num_heads: attention heads (not in any weight shape); optional when the folder's config.json,
      the .ckpt's hyper-parameters or the `rotary_emb.inv_freq` buffer tell.
    use_ema: a Lightning .ckpt: keep its EMA weights as the run's EMA parameters (what
      `dlm_jax.load` uses; the raw `state_dict` is kept as the parameters). Otherwise both are
      the raw weights.
    config: the recipe the run gets (data, training, sampling); the model fields are set from the
      checkpoint. Default: `default_import_config` (GPT-2 tokenizer, seq_len = the model length).
    devices: the devices to build the state on (default: the first local device).
    log: where progress lines go.

  Returns:
    A summary: sizes, which weights, parameter count, the workdir.
  """
  if _has_checkpoints(workdir):
    raise InteropError(f"--workdir {workdir} already holds checkpoints; import into a new "
                       "folder (nothing there was changed).")
  log(f"Reading {checkpoint} ...")
  src = read_source(checkpoint)
  given = dict(src.given)
  if given.get("time_conditioning"):
    raise InteropError(
        f"{checkpoint} is a time-conditioned MDLM (time_conditioning: true): its network takes "
        "sigma(t), which dlm-jax's MDLM does not feed (it conditions on t). Only the published "
        "default, time_conditioning false (sigma = 0), can be imported.")
  if use_ema and src.kind not in ("lightning",):
    raise InteropError(f"--ema: {checkpoint} is a {src.kind} checkpoint; only a Lightning .ckpt "
                       "carries separate EMA weights (its ['ema']['shadow_params']).")
  if use_ema and src.ema is None:
    raise InteropError(f"--ema: {checkpoint} has no ['ema']['shadow_params'] entry; import its "
                       "state_dict without --ema.")
  backbone = {k: v for k, v in src.state_dict.items() if k.startswith(pytorch_dit.PREFIX)}
  if src.kind == "lightning" and not backbone:
    raise InteropError(f"{checkpoint}: its state_dict has no backbone.* keys (first keys: "
                       f"{list(src.state_dict)[:4]}); is it a checkpoint of the published MDLM?")
  sd = backbone if src.kind == "lightning" else src.state_dict
  sizes = pytorch_dit.infer_sizes(sd, num_heads, given)
  ema_sd = pytorch_dit.ema_state_dict(sd, src.ema, sizes) if use_ema else None
  log(f"  {src.kind}: {len(sd)} tensors; {sizes.num_layers} blocks x {sizes.d_model}, "
      f"{sizes.num_heads} heads, cond {sizes.cond_dim}, vocab {sizes.vocab_size}"
      + ("; EMA weights" if use_ema else ""))
  if config is None:
    config = default_import_config(int(given.get("model_length", 1024)))
  else:
    config = ml_collections.ConfigDict(config.to_dict())
  if config.method != "mdlm":
    raise InteropError(f"--config sets method={config.method!r}: the published weights are an "
                       "MDLM denoiser; use an mdlm recipe (e.g. configs/mdlm_owt_dit.py).")
  apply_dit(config, sizes)
  devices = list(devices or jax.local_devices()[:1])
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), devices)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  exp = exp_lib.Experiment.create(config, mesh=mesh)
  tok = exp.tokenizer
  if int(tok.vocab_size) != sizes.vocab_size:
    raise StateDictError(
        f"{pytorch_dit.PREFIX}vocab_embed.embedding has {sizes.vocab_size} rows, but the "
        f"tokenizer config.data.tokenizer={config.data.tokenizer!r} has {tok.vocab_size} ids "
        "(with its mask id): give the tokenizer the model was trained with (mdlm-owt: gpt2, "
        "vocab 50258, mask 50257).")
  log(f"  tokenizer {config.data.tokenizer}: vocab {tok.vocab_size}, mask id {tok.mask_id}")
  raw = _float32(pytorch_dit.to_params(sd, sizes))
  ema = _float32(pytorch_dit.to_params(ema_sd, sizes)) if ema_sd is not None else None
  meta = dict(imported_from=dict(checkpoint=os.path.abspath(checkpoint), kind=src.kind,
                                 weights="ema" if use_ema else "state_dict"))
  log(f"Writing {workdir} ...")
  write_workdir(exp, workdir, raw, ema, step=0, extra_meta=meta, log=log)
  n = int(sum(x.size for x in jax.tree.leaves(raw)))
  log(f"Imported {n:,} parameters into {workdir} (step 0).")
  return dict(workdir=workdir, kind=src.kind, num_params=n, weights=meta["imported_from"]["weights"],
              **dataclasses.asdict(sizes))


# -- export ----------------------------------------------------------------------------------
def flatten(tree: Any) -> dict[str, np.ndarray]:
  """{'block_0/qkv/kernel': array, ...}: the parameter tree with '/'-joined paths."""
  return {ckpt_lib._path_str(path): np.ascontiguousarray(np.asarray(leaf))  # pylint: disable=protected-access
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def hf_config(run_config: ml_collections.ConfigDict, sizes: pytorch_dit.DitSizes,
              mask_id: int) -> dict[str, Any]:
  """config.json of a Hugging Face MDLM folder (the field names of kuleshov-group/mdlm-owt)."""
  return {"architectures": ["MDLM"], "model_type": "mdlm",
          "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig",
                       "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
          "vocab_size": sizes.vocab_size, "model_length": int(run_config.data.seq_len),
          "hidden_dim": sizes.d_model, "cond_dim": sizes.cond_dim, "n_blocks": sizes.num_layers,
          "n_heads": sizes.num_heads, "dropout": float(run_config.model.dropout),
          "time_conditioning": False, "return_dict": False, "torch_dtype": "float32",
          "mask_index": int(mask_id)}


def export(workdir: str, out: str, *, use_ema: bool = True, step: int | None = None,
           overwrite: bool = False, log=print) -> dict[str, Any]:
  """Writes a run's parameters as safetensors with its config as JSON.

  out/model.safetensors (our parameter names, '/'-joined) and out/config.json (the run's
  config); for a run of the published MDLM network also out/pytorch/ in its layout
  (model.safetensors with `backbone.*` keys + a Hugging Face config.json), which
  `import_mdlm` reads back to the same parameters.

  Args:
    use_ema: the EMA parameters when the run kept them (else the raw ones).
    step: a checkpoint step (default: the newest).
    overwrite: replace files of an earlier export in `out`.
  """
  files = [os.path.join(out, "model.safetensors"), os.path.join(out, "config.json"),
           os.path.join(out, "pytorch", "model.safetensors")]
  if not overwrite and any(os.path.exists(f) for f in files):
    raise InteropError(f"--out {out} already holds an export; choose another folder or pass "
                       "--overwrite.")
  st = _safetensors()
  run = api.load(workdir, step=step, use_ema=use_ema, devices=jax.local_devices()[:1])
  which = "ema" if (use_ema and run.config.optim.ema_decay > 0) else "raw"
  params = jax.tree.map(np.asarray, jax.device_get(nn.meta.unbox(run.params)))
  os.makedirs(out, exist_ok=True)
  meta = {"format": "dlm-jax", "weights": which, "step": str(run.step), "workdir": workdir}
  st.save_file(flatten(params), files[0], metadata=meta)
  with open(files[1], "w", encoding="utf-8") as f:
    f.write(run.config.to_json_best_effort(indent=2))
  summary = dict(out=out, step=run.step, weights=which, files=files[:2], pytorch=None)
  log(f"Wrote {files[0]} ({which} parameters of step {run.step}) and {files[1]}.")
  why = ([] if run.config.method == "mdlm" else [f"method={run.config.method!r}"])
  why += pytorch_dit.incompatibilities(run.method.model_cfg)
  if why:
    summary["pytorch"] = "not the published MDLM network: " + "; ".join(why)
    log(f"No PyTorch layout: {summary['pytorch']}.")
    return summary
  sizes = pytorch_dit.sizes_of(run.method.model_cfg)
  sd = pytorch_dit.to_state_dict(params, sizes)
  os.makedirs(os.path.join(out, "pytorch"), exist_ok=True)
  st.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, files[2],
               metadata={"format": "pt"})
  with open(os.path.join(out, "pytorch", "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config(run.config, sizes, run.tokenizer.mask_id), f, indent=2)
  summary["pytorch"] = os.path.join(out, "pytorch")
  summary["files"] = files + [os.path.join(out, "pytorch", "config.json")]
  log(f"Wrote {summary['pytorch']}/ in the PyTorch MDLM layout (backbone.* keys, "
      "Hugging Face config.json).")
  return summary
