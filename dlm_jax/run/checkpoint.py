"""Orbax checkpoints: train state (params, EMA, optimizer, step), data iterator, config, metadata.

Saves go to a temporary directory that Orbax renames only once complete, so a crash or a full
disk during a save never touches the previous checkpoint; a failed save raises
`CheckpointSaveError` naming the step and the newest intact checkpoint. Restoring walks back from
the newest step: a truncated or corrupt checkpoint is reported and the one before it is used. A
checkpoint whose arrays do not match the current config (a changed shape, optimizer or EMA
setting) is refused with the differing fields named, never mistaken for a corrupt one.

Every process calls every method here (Orbax coordinates the multi-host writes: each process
writes its own shards, process 0 finalises).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from dlm_jax import paths

try:  # grain's Orbax handler for iterator state (registered on import).
  import grain  # pylint: disable=g-import-not-at-top
  _GRAIN_SAVE = grain.checkpoint.CheckpointSave
  _GRAIN_RESTORE = grain.checkpoint.CheckpointRestore
except Exception:  # pylint: disable=broad-except  # pragma: no cover
  _GRAIN_SAVE = _GRAIN_RESTORE = None


class CheckpointError(RuntimeError):
  """No usable checkpoint, or a checkpoint incompatible with the current config."""


class CheckpointSaveError(CheckpointError):
  """Writing a checkpoint failed (e.g. disk full); the earlier checkpoints are intact."""


def _path_str(path: tuple[Any, ...]) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def tree_signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params/block_0/qkv/kernel': (shape, dtype), ...} of arrays, abstract arrays or metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = getattr(leaf, "shape", None)
    if shape is None:
      continue
    out[_path_str(path)] = (tuple(shape), str(getattr(leaf, "dtype", "")))
  return out


def describe_mismatch(saved: dict[str, Any], wanted: dict[str, Any], limit: int = 3) -> list[str]:
  """Human-readable differences between two tree signatures (at most `limit` of each kind)."""
  lines = []
  for name in sorted(set(saved) & set(wanted)):
    if saved[name][0] != wanted[name][0]:
      lines.append(f"{name}: checkpoint shape {saved[name][0]}, config gives {wanted[name][0]}")
  lines = lines[:limit]
  only_ckpt = sorted(set(saved) - set(wanted))
  only_cfg = sorted(set(wanted) - set(saved))
  if only_ckpt:
    lines.append(f"{len(only_ckpt)} array(s) only in the checkpoint, e.g. {only_ckpt[:limit]}")
  if only_cfg:
    lines.append(f"{len(only_cfg)} array(s) only in the config's state, e.g. {only_cfg[:limit]}")
  return lines


def checkpoint_dir(workdir: str) -> str:
  """<workdir>/checkpoints; local paths made absolute (Orbax requires it), URLs kept."""
  return paths.join(paths.absolute(workdir), "checkpoints")


def retention_policy(keep: int, keep_period: int = 0):
  """Orbax's preservation policy: the newest `keep` steps, plus every multiple of keep_period."""
  policies = [ocp.checkpoint_managers.LatestN(n=keep)]
  if keep_period:
    policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=keep_period))
  return ocp.checkpoint_managers.AnyPreservationPolicy(policies)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with fall-back restore.

  `read_only=True` (load, sample, evaluate, score, init_from) opens an existing checkpoints/
  folder without creating, cleaning or deleting anything; a workdir without one is a
  CheckpointError.
  """

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, keep_period: int = 0,
               read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    paths.path(self.directory)  # a gs:// workdir without the [gcp] extra: say what to install
    self.read_only = read_only
    if read_only:
      if not paths.exists(self.directory):
        raise CheckpointError(f"{workdir} has no checkpoints/ folder; is it a training "
                              "--workdir?")
      # Every option read-only mode would otherwise override (with a warning each) is set here.
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, cleanup_tmp_directories=False, save_interval_steps=0,
          enable_async_checkpointing=False)
    else:
      options = ocp.CheckpointManagerOptions(
          create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
          preservation_policy=retention_policy(keep, keep_period))
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._in_flight: int | None = None  # step of an async save not yet known to be complete
    self.skipped_steps: list[int] = []  # unreadable steps passed over by the last restore()

  def all_steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict,
           meta: dict[str, Any], data_iter: Any = None, force: bool = False) -> bool:
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only; it cannot save.")
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
                 meta=ocp.args.JsonSave(meta))
    if data_iter is not None and _GRAIN_SAVE is not None:
      items["data"] = _GRAIN_SAVE(data_iter)
    self.wait()  # surfaces a failure of the previous (async) save under its own step
    self._in_flight = step
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # pylint: disable=broad-except  # e.g. OSError(ENOSPC)
      raise self._save_error(step, e) from e
    if not saved:
      self._in_flight = None
    return saved

  def wait(self) -> None:
    """Blocks until the pending save is on disk; raises CheckpointSaveError if it failed."""
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      step, self._in_flight = self._in_flight, None
      raise self._save_error(step, e) from e
    self._in_flight = None

  def _save_error(self, step: int | None, error: BaseException) -> CheckpointSaveError:
    self._in_flight = None
    try:
      intact = [s for s in self.all_steps() if s != step]
    except Exception:  # pylint: disable=broad-except
      intact = []
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    where = f"step {step}" if step is not None else "a step"
    keep = (f"the previous checkpoint (step {intact[-1]}) is intact" if intact
            else "no earlier checkpoint exists")
    return CheckpointSaveError(
        f"Saving the checkpoint of {where} in {self.directory} failed "
        f"({type(error).__name__}: {first}); {keep}. Free disk space (or fix the storage or its "
        "permissions) and re-run the same command to resume from there.")

  def read_meta(self, step: int) -> dict[str, Any]:
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def read_config(self, step: int) -> ml_collections.ConfigDict:
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored["config"])

  def restore(self, abstract_state: Any, step: int | None = None, data_iter: Any = None,
              check_meta=None) -> tuple[int, Any, dict[str, Any]]:
    """Restores `step` (default: newest good one) onto the shardings of `abstract_state`.

    Walks back over older steps when a checkpoint cannot be read; `check_meta(meta)` may raise
    CheckpointError for an incompatible checkpoint (that error is not skipped: it is the
    user's config that must change). Returns (step, state, meta).
    """
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"No checkpoint for step {step} in {self.directory}; "
                              f"available: {steps}.")
      candidates = [step]
    else:
      candidates = list(reversed(steps))
    if not candidates:
      raise CheckpointError(f"No checkpoint found in {self.directory}.")
    errors = []
    for s in candidates:
      try:
        meta = self.read_meta(s)
      except Exception as e:  # pylint: disable=broad-except
        errors.append((s, e))
        logging.error("Checkpoint step %d in %s is unreadable (%s: %s); trying an older one.",
                      s, self.directory, type(e).__name__, e)
        continue
      if check_meta is not None:
        check_meta(meta)
      self._check_structure(s, abstract_state)
      items = dict(state=ocp.args.StandardRestore(abstract_state))
      if data_iter is not None and _GRAIN_RESTORE is not None:
        items["data"] = _GRAIN_RESTORE(data_iter)
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        errors.append((s, e))
        logging.error("Checkpoint step %d in %s is corrupt or incomplete (%s: %s); "
                      "trying an older one.", s, self.directory, type(e).__name__,
                      str(e).splitlines()[0] if str(e) else "")
        continue
      if errors:
        logging.warning("Restored step %d after skipping unreadable checkpoint(s) %s.", s,
                        [x[0] for x in errors])
      self.skipped_steps = [x[0] for x in errors]
      return s, restored["state"], meta
    raise CheckpointError(
        f"None of the checkpoints {candidates} in {self.directory} could be restored: " +
        "; ".join(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                  for s, e in errors))

  def _check_structure(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointError when the saved arrays do not fit the config's state.

    Unreadable metadata is left to the restore (which then walks back as for any corrupt step).
    """
    try:
      path = epath.Path(self.directory) / str(step) / "state"
      meta = ocp.StandardCheckpointHandler().metadata(path)
      saved = tree_signature(getattr(meta, "item_metadata", meta))
    except Exception:  # pylint: disable=broad-except
      return
    wanted = tree_signature(abstract_state)
    diffs = describe_mismatch(saved, wanted)
    if diffs:
      raise CheckpointError(
          f"The checkpoint of step {step} in {self.directory} does not fit the current config: "
          + "; ".join(diffs) + ". A model, optimizer (grad_clip, ema_decay) or tokenizer setting "
          "changed since the run started: restore the original values or use a new --workdir.")

  def set_aside(self, steps: list[int]) -> list[str]:
    """Moves unreadable checkpoints to a sibling `checkpoints_unreadable/` folder.

    A run that resumed from an older step would otherwise collide with them when it saves the
    same step again. Nothing is deleted. Call it from every process (process 0 moves, all sync).
    """
    moved = []
    if steps and jax.process_index() == 0:
      dest = epath.Path(self.directory).parent / "checkpoints_unreadable"
      dest.mkdir(parents=True, exist_ok=True)
      for step in steps:
        src = epath.Path(self.directory) / str(step)
        if src.exists():
          target = dest / f"{step}.{int(time.time())}"
          src.rename(target)
          moved.append(str(target))
          logging.warning("Moved unreadable checkpoint %s to %s.", src, target)
    if steps and jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("dlm_jax_checkpoint_set_aside")
    self.manager.reload()
    return moved

  def close(self) -> None:
    self.manager.close()


def single_device_abstract(tree: Any, device: jax.Device | None = None) -> Any:
  """ShapeDtypeStructs with a single-device sharding (restore in a notebook, any topology)."""
  device = device or jax.devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
