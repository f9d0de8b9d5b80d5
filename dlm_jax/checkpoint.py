"""Orbax checkpoints: train state (params, EMA, optimizer, step), data iterator, config, metadata.

Saves go to a temporary directory that Orbax renames only once complete, so a crash or a full
disk during a save never touches the previous checkpoint. Restoring walks back from the newest
step: a truncated or corrupt checkpoint is reported and the one before it is used.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

try:  # grain's Orbax handler for iterator state (registered on import).
  import grain  # pylint: disable=g-import-not-at-top
  _GRAIN_SAVE = grain.checkpoint.CheckpointSave
  _GRAIN_RESTORE = grain.checkpoint.CheckpointRestore
except Exception:  # pylint: disable=broad-except  # pragma: no cover
  _GRAIN_SAVE = _GRAIN_RESTORE = None


class CheckpointError(RuntimeError):
  """No usable checkpoint, or a checkpoint incompatible with the current config."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with fall-back restore."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict,
           meta: dict[str, Any], data_iter: Any = None, force: bool = False) -> bool:
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
                 meta=ocp.args.JsonSave(meta))
    if data_iter is not None and _GRAIN_SAVE is not None:
      items["data"] = _GRAIN_SAVE(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

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
      return s, restored["state"], meta
    raise CheckpointError(
        f"None of the checkpoints {candidates} in {self.directory} could be restored: " +
        "; ".join(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                  for s, e in errors))

  def close(self) -> None:
    self.manager.close()


def single_device_abstract(tree: Any, device: jax.Device | None = None) -> Any:
  """ShapeDtypeStructs with a single-device sharding (restore in a notebook, any topology)."""
  device = device or jax.devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
