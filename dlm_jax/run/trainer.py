"""The one train loop (library form): steps, prefetching, evaluation, checkpointing.

`python -m dlm_jax.train` is its command-line entry point; tests and benchmarks call `train()` here.

Multi-host: every process runs this loop on its own data shard (`make_train_iterator` reads
documents p, p+P, ...); the global batch is assembled with `jax.make_array_from_process_local_data`;
all processes save and restore checkpoints together through Orbax; only process 0 takes the
workdir lease (`run/lease.py`) and writes config.json, the tokenizer files, metrics and console
output. SIGTERM on any process stops all of them at the same step; so does a lost lease (without
saving).
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlm_jax import hardware
from dlm_jax import metrics as metrics_lib
from dlm_jax import parallel
from dlm_jax import paths
from dlm_jax.data import pipeline
from dlm_jax.evaluation import likelihood
from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax.run import experiment as exp_lib
from dlm_jax.run import lease as lease_lib


class NonFiniteLossError(RuntimeError):
  """The loss or gradients became NaN/inf and config.train.nan_policy='stop'."""


class DataError(RuntimeError):
  """The input pipeline failed while reading or preparing a training batch."""


# In a multi-process run the SIGTERM flag is shared through a collective every this many steps
# (a host sync; every step would stall the device queue). A single process checks every step.
SIGNAL_SYNC_EVERY = 10


# -- data ----------------------------------------------------------------------------------------
class PrefetchIterator:
  """Prepares global batches on a host thread; checkpoints the position of CONSUMED batches.

  Implements get_state()/set_state() (bytes) and start_prefetch() so grain's Orbax handler can
  save it: a restored run continues with the first batch the model has not trained on.
  """

  def __init__(self, it: Any, mesh: jax.sharding.Mesh, size: int = 2):
    self._it = it
    self._mesh = mesh
    self._size = max(int(size), 0)
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._consumed_state = self._raw_state()

  def _raw_state(self) -> Any:
    return self._it.get_state()

  def _produce(self) -> tuple[Any, Any]:
    try:
      batch = next(self._it)
    except StopIteration:
      raise
    except Exception as e:  # pylint: disable=broad-except  # named below; traceback chained
      first = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise DataError(
          f"Reading the training data failed ({type(e).__name__}: {first}). A data file may be "
          "corrupt or truncated: check config.data (source, path, tfds_name, tfds_data_dir) or "
          "re-prepare the dataset.") from e
    state = self._raw_state()
    return parallel.global_batch_from_local(batch, self._mesh), state

  def _worker(self) -> None:
    try:
      while not self._stop.is_set():
        item = self._produce()
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # pylint: disable=broad-except  # surfaced in __next__
      self._queue.put(e)

  def __iter__(self) -> "PrefetchIterator":
    return self

  def __next__(self):
    if self._size == 0:
      batch, state = self._produce()
    else:
      if self._thread is None:
        self.start_prefetch()
      item = self._queue.get()
      if isinstance(item, BaseException):
        raise item
      batch, state = item
    self._consumed_state = state
    return batch

  def start_prefetch(self) -> None:
    if self._size and self._thread is None:
      self._queue = queue.Queue(maxsize=self._size)
      self._stop.clear()
      self._thread = threading.Thread(target=self._worker, daemon=True)
      self._thread.start()

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    self._thread = None

  def get_state(self) -> bytes:
    return json.dumps(self._consumed_state).encode()

  def set_state(self, state: bytes) -> None:
    if self._thread is not None:
      raise RuntimeError("set_state after prefetching started.")
    st = json.loads(state.decode() if isinstance(state, bytes) else state)
    self._it.set_state(st)
    self._consumed_state = self._raw_state()


# -- the step ------------------------------------------------------------------------------------
def ema_decay_at(decay: float, warmup: bool, num_updates: jax.Array) -> jax.Array | float:
  """The EMA decay of the update after `num_updates` updates: `decay`, or with warm-up
  min(decay, (1 + n) / (10 + n)), so the random initialisation leaves the average early."""
  if not warmup:
    return decay  # a Python float: 1 - decay is then formed in double precision, as before
  n = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def micro_batches(batch: dict[str, jax.Array], k: int, group: int = 1) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B / k, ...]: micro-batch j holds the groups of `group` rows j, j + k, ...

  Strided, so each micro-batch spans the whole batch (its stratified times too) and takes
  the same rows from every device's shard; `row_index` [k, B / k] records each row's place
  in the batch (`diffusion.keys.step_rows`).
  """
  def split(x):
    b = x.shape[0]
    x = x.reshape((b // (group * k), k, group) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((k, b // k) + x.shape[3:])

  b = batch["tokens"].shape[0]
  out = {name: split(x) for name, x in batch.items()}
  out["row_index"] = split(jnp.arange(b, dtype=jnp.int32))
  return out


def _loss_and_grads(exp: exp_lib.Experiment, params, batch, key):
  """(loss, metrics, grads) of the global batch, in optim.grad_accum_steps micro-batches.

  The micro-batches' gradients are summed weighted by their metrics['loss_weight'] (the count
  the method normalised by; 1 when absent), so with every draw keyed by global example ids and
  batch positions the result is the undivided batch's loss and gradient.
  """
  method = exp.method
  k = int(exp.config.optim.grad_accum_steps)

  def loss_fn(p, b):
    return method.train_loss(p, b, key, train=True)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    (loss, metrics), grads = grad_fn(params, batch)
    metrics = dict(metrics)
    metrics.pop("loss_weight", None)
    return loss, metrics, grads

  micro = micro_batches(batch, k, int(getattr(method, "row_group", 1)))
  mesh = exp.mesh
  micro = {n: jax.lax.with_sharding_constraint(
      x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
          None, parallel.BATCH_AXES, *([None] * (x.ndim - 2))))) for n, x in micro.items()}

  def body(acc, mb):
    mb = {n: jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh, x.ndim))
          for n, x in mb.items()}
    (loss, metrics), grads = grad_fn(params, mb)
    metrics = dict(metrics)
    w = jnp.asarray(metrics.pop("loss_weight", 1.0), jnp.float32)
    acc = jax.tree.map(lambda a, g: a + w * g, acc, grads)
    return acc, (loss, w, metrics)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grad_sum, (losses, weights, metrics) = jax.lax.scan(body, zeros, micro)
  total = jnp.sum(weights)
  inv = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
  grads = jax.tree.map(lambda g: g * inv, grad_sum)
  share = jnp.where(total > 0, weights * inv, 1.0 / k)  # each micro-batch's share of the batch
  summed = set(getattr(method, "summed_metrics", ()))
  metrics = {n: jnp.sum(v, 0) if n in summed else jnp.tensordot(share, v, 1)
             for n, v in metrics.items()}
  loss = jnp.sum(share * losses)
  metrics["loss"] = loss
  return loss, metrics, grads


def make_train_step(exp: exp_lib.Experiment):
  """Returns train_step(state, batch, base_key) -> (state, metrics), pure and jittable.

  One call is one optimizer update (optim.grad_accum_steps micro-batches inside it): the step
  counter, the learning-rate schedule, the EMA and the logged metrics all count updates.
  """
  tx = exp.tx
  ema_decay = float(exp.config.optim.ema_decay)
  ema_warmup = bool(exp.config.optim.ema_warmup)
  global_batch = exp.config.train.global_batch_size

  def train_step(state: exp_lib.TrainState, batch: dict[str, jax.Array], base_key: jax.Array):
    key = jax.random.fold_in(base_key, state.step)
    if "example_id" not in batch:
      batch = dict(batch, example_id=state.step * global_batch + jnp.arange(global_batch))
    loss, metrics, grads = _loss_and_grads(exp, state.params, batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if state.ema_params is not None:
      decay = ema_decay_at(ema_decay, ema_warmup, state.step)
      ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    else:
      ema = None
    new = exp_lib.TrainState(step=state.step + 1, params=params, ema_params=ema,
                             opt_state=opt_state)
    # A non-finite step never enters the state: keep the old values (the step still counts).
    keep = lambda n, o: jnp.where(finite, n, o)  # noqa: E731
    new = exp_lib.TrainState(
        step=new.step, params=jax.tree.map(keep, new.params, state.params),
        ema_params=jax.tree.map(keep, new.ema_params, state.ema_params),
        opt_state=jax.tree.map(keep, new.opt_state, state.opt_state))
    metrics = dict(metrics, grad_norm=grad_norm, param_norm=optax.tree.norm(state.params),
                   update_norm=optax.tree.norm(updates), lr=exp.lr_schedule(state.step),
                   nonfinite=(~finite).astype(jnp.float32))
    if ema_warmup and state.ema_params is not None:
      metrics["ema_decay"] = ema_decay_at(ema_decay, ema_warmup, state.step)
    return new, metrics

  return train_step


def make_eval_step(exp: exp_lib.Experiment):
  def eval_step(params, batch, key):
    return exp.method.eval_sums(params, batch, key)
  return eval_step


def jit_steps(exp: exp_lib.Experiment):
  """The train and eval steps under jax.jit with declared shardings and a donated state.

  Not yet bound to the mesh: call them inside `parallel.sharding_context(exp.mesh)`. The trainer
  runs them (`compile_steps`); `run/step.py` lowers the same objects ahead of time.
  """
  state_sh = exp.state_shardings()
  rep = parallel.replicated(exp.mesh)
  train_step = jax.jit(make_train_step(exp), in_shardings=(state_sh, None, rep),
                       out_shardings=(state_sh, rep), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(exp), out_shardings=rep)
  return train_step, eval_step


def compile_steps(exp: exp_lib.Experiment):
  """jit-compiles the train and eval steps with declared shardings and a donated state."""
  train_step, eval_step = jit_steps(exp)
  return (parallel.in_sharding_context(train_step, exp.mesh),
          parallel.in_sharding_context(eval_step, exp.mesh))


def evaluate_nelbo(exp: exp_lib.Experiment, eval_step, params, num_batches: int | None,
                   seed: int = 0) -> dict[str, float]:
  """The likelihood bound over (up to num_batches of) the run's evaluation split."""
  return likelihood.nelbo_report(eval_step, params,
                                 exp_lib.make_eval_iterator(exp.config, exp.tokenizer), exp.mesh,
                                 num_batches, int(exp.config.diffusion.eval_num_t), seed)


# -- the loop ------------------------------------------------------------------------------------
class _SigtermFlag:
  def __init__(self):
    self.raised = False
    self._prev = None

  def install(self):
    if threading.current_thread() is threading.main_thread():
      self._prev = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint and stopping (all processes stop at "
                    "the same step, within %d steps).", SIGNAL_SYNC_EVERY)
    self.raised = True

  def uninstall(self):
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)


def _any_process(*flags: bool) -> tuple[bool, ...]:
  """Each flag OR-ed over all processes (one collective for all of them)."""
  if jax.process_count() == 1:
    return tuple(bool(f) for f in flags)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  got = multihost_utils.process_allgather(np.asarray(flags, np.int32))
  return tuple(bool(x) for x in np.any(np.asarray(got).reshape(-1, len(flags)), axis=0))


def _take_lease(workdir: str, cfg, takeover: bool) -> lease_lib.WorkdirLease | None:
  """Process 0 takes the workdir lease; every process stops if it could not."""
  lease, error = None, None
  if parallel.is_main_process():
    lease = lease_lib.WorkdirLease(workdir, cfg.train.lease_stale_secs)
    try:
      lease.acquire(takeover=takeover)
    except lease_lib.LeaseError as e:
      error = e
  (failed,) = _any_process(error is not None)
  if failed:
    raise error or lease_lib.LeaseHeldError(
        f"Process 0 could not take the lease of the workdir {workdir} (its log names the holder); "
        "stopping.")
  if lease is not None:
    lease.start_renewing()
  return lease


def _lease_lost_error(lease: lease_lib.WorkdirLease | None) -> lease_lib.LeaseLostError:
  if lease is not None and lease.lost:
    return lease_lib.LeaseLostError(lease.lost)
  return lease_lib.LeaseLostError("Process 0 lost the workdir lease (its log says to whom); "
                                  "stopping without saving again.")


def _restore_init_from(exp, state, workdir: str):
  """Fine-tuning: take params (and EMA) from another run's newest checkpoint."""
  try:
    other = ckpt_lib.Checkpointer(workdir, read_only=True)
    step, restored, _ = other.restore(exp.abstract_state(), check_meta=exp.check_meta)
  except ckpt_lib.CheckpointError as e:
    raise ckpt_lib.CheckpointError(f"config.train.init_from={workdir!r}: {e}") from e
  logging.info("Initialised parameters from %s (step %d).", workdir, step)
  other.close()
  return state.replace(params=restored.params,
                       ema_params=restored.ema_params if state.ema_params is not None else None)


def _write_config_json(cfg, workdir: str) -> None:
  """config.json for humans (process 0 only; Orbax saves the config with every checkpoint)."""
  paths.write_text(paths.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2))


def train(config, workdir: str, stop_after_steps: int | None = None,
          devices: Sequence[jax.Device] | None = None, takeover: bool = False) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the last logged metrics.

  Args:
    config: the run's config (validated here).
    workdir: checkpoints, metrics, config.json and the tokenizer files go here (a local path or
      gs://...).
    stop_after_steps: stop (with a checkpoint) after this many steps of this call.
    devices: the devices of the mesh (default: all, over all processes). A run can resume on
      another device count or mesh shape than it was saved with.
    takeover: take the workdir lease even if another live trainer holds it (that trainer then
      stops at its next renewal or save without writing again).

  Raises:
    lease_lib.LeaseHeldError: another trainer holds the workdir (the message names it).
  """
  mesh = parallel.make_mesh(config.mesh, devices) if devices is not None else None
  exp = exp_lib.Experiment.create(config, mesh=mesh)
  cfg = exp.config
  logging.info("Mesh %s on %d devices (%d processes); %s parameters.", dict(exp.mesh.shape),
               jax.device_count(), jax.process_count(), f"{exp.num_params():,}")
  paths.path(workdir)  # a gs:// workdir without the [gcp] extra: say what to install, now
  lease = _take_lease(workdir, cfg, takeover)  # before anything is written into the workdir
  try:
    return _train(exp, workdir, stop_after_steps, lease)
  finally:
    if lease is not None:
      lease.release()


def _train(exp: exp_lib.Experiment, workdir: str, stop_after_steps: int | None,
           lease: lease_lib.WorkdirLease | None) -> dict[str, Any]:
  cfg = exp.config
  main = parallel.is_main_process()
  lease_lost = lambda: lease is not None and lease.lost is not None  # noqa: E731
  ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.train.keep_ckpts,
                              keep_period=cfg.train.keep_period)
  data_it = PrefetchIterator(exp_lib.make_train_iterator(cfg, exp.tokenizer), exp.mesh,
                             cfg.data.prefetch)
  start_step = 0
  if ckpt.latest_step() is not None:
    start_step, state, _ = ckpt.restore(exp.abstract_state(), data_iter=data_it,
                                        check_meta=exp.check_meta)
    logging.info("Resumed from step %d in %s.", start_step, ckpt.directory)
    # Newer but unreadable checkpoints would collide with the saves of this run: move them aside.
    ckpt.set_aside([s for s in ckpt.skipped_steps if s > start_step])
    if main:
      print(f"Resumed from checkpoint step {start_step}.", flush=True)
  else:
    state = exp.init_state(cfg.seed)
    if cfg.train.init_from:
      state = _restore_init_from(exp, state, cfg.train.init_from)

  if main:  # only now: a refused resume must not overwrite the run's config.json
    _write_config_json(cfg, workdir)
    # The run carries its tokenizer: load/sample/evaluate/score never need the corpus for it.
    exp_lib.save_run_tokenizer(workdir, exp.tokenizer)
  train_step, eval_step = compile_steps(exp)
  base_key = jax.random.key(cfg.seed)
  # Drops the metric rows an interrupted run wrote past the step restored here.
  writer = metrics_lib.MetricWriter(workdir, start_step=start_step)
  total = cfg.train.num_steps
  tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
  progress = metrics_lib.Progress(total, start_step, tokens_per_step)
  flops_per_step = exp.step_flops()
  peak_flops = hardware.peak_flops_per_device(list(exp.mesh.devices.flat))
  sigterm = _SigtermFlag()
  sigterm.install()
  last_saved = start_step
  pending: list[dict[str, jax.Array]] = []
  last: dict[str, Any] = {}
  meta = exp.checkpoint_meta()
  stopped_by_signal = False

  def save(step: int) -> None:
    # A failed save (disk full, quota, storage error) raises CheckpointSaveError: the run stops
    # rather than train on without checkpoints; Orbax never touches the earlier ones.
    nonlocal last_saved
    if step == last_saved:
      return
    # Only the lease holder writes: renew it now (process 0), and stop everywhere if it is gone.
    lost = False
    if lease is not None:
      try:
        lease.renew()
      except lease_lib.LeaseLostError:
        lost = True
      except Exception as e:  # pylint: disable=broad-except  # storage trouble: the save says
        logging.warning("Renewing the workdir lease failed before saving: %s", e)
    if _any_process(lost)[0]:
      raise _lease_lost_error(lease)
    ckpt.save(step, state, cfg, dict(meta, step=step), data_it, force=True)
    last_saved = step
    writer.flush(force=True)  # on gs://: the rows a restart from this step keeps are uploaded

  step = start_step
  run_limit = total if stop_after_steps is None else min(total, start_step + stop_after_steps)
  first_batch_printed = False
  try:
    while step < run_limit:
      batch = next(data_it)
      if main and cfg.train.print_batch and not first_batch_printed:
        first_batch_printed = True
        _print_first_batch(batch, exp.tokenizer)
      state, metrics = train_step(state, batch, base_key)
      step += 1
      pending.append(metrics)
      # Every process evaluates this at the same steps, so all stop together.
      stop_now, lost = _any_process(sigterm.raised, lease_lost()) if (
          jax.process_count() == 1 or step % SIGNAL_SYNC_EVERY == 0) else (False, False)
      if lost:  # another trainer took the workdir over: write nothing more
        raise _lease_lost_error(lease)
      stopped_by_signal = stopped_by_signal or stop_now
      if step % cfg.train.log_every == 0 or step == run_limit or stop_now:
        fetched = jax.device_get(pending)
        pending = []
        mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        mean["nonfinite"] = float(np.sum([m["nonfinite"] for m in fetched]))
        rates = progress.rates(step, mean.get("model_tokens"))
        rates.update(hardware.throughput(flops_per_step, rates["steps_per_sec"], exp.mesh.size,
                                         peak_flops))
        mean.update(rates)
        writer.write_scalars(step, mean, prefix="train/")
        progress.log(step, mean, rates)
        last = mean
        if mean["nonfinite"] > 0:
          msg = (f"{int(mean['nonfinite'])} step(s) up to step {step} had a NaN/inf loss or "
                 "gradient; those updates were not applied.")
          if cfg.train.nan_policy == "stop":
            raise NonFiniteLossError(
                msg + f" Stopping (config.train.nan_policy='stop'); the last good checkpoint "
                f"(step {last_saved}) is kept. Lower config.optim.lr or check the data, or set "
                "config.train.nan_policy='skip'.")
          logging.warning(msg + " Continuing (config.train.nan_policy='skip').")
      if step % cfg.train.eval_every == 0 or step == total:  # the final step too
        params = state.ema_params if state.ema_params is not None else state.params
        ev = evaluate_nelbo(exp, eval_step, params, cfg.train.eval_batches)
        writer.write_scalars(step, ev, prefix="eval/")
        if main:
          print(f"eval @ {step}: NELBO {ev['nelbo_nats_per_token']:.4f} nats/token, "
                f"{ev['bits_per_token']:.3f} bits/token, PPL <= {ev['perplexity_bound']:.2f}",
                flush=True)
      if step % cfg.train.ckpt_every == 0:
        save(step)
      if stop_now:
        logging.warning("Stopping at step %d after SIGTERM (checkpoint saved).", step)
        break
    save(step)
    ckpt.wait()  # the last save is on disk (or its failure raised) before returning
  finally:
    sigterm.uninstall()
    data_it.close()
    try:
      ckpt.wait()
    except ckpt_lib.CheckpointSaveError as e:  # already failing: report, keep the first error
      logging.error("%s", e)
    try:
      ckpt.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("Closing the checkpoint manager failed: %s", e)
    if lease_lost():
      writer.discard()  # the workdir's metrics belong to the trainer that took over
    else:
      writer.close()
  if main and stopped_by_signal:
    print(f"Saved checkpoint at step {step} after SIGTERM; re-run the same command to resume.",
          flush=True)
  return dict(last, step=step)


def _print_first_batch(batch: dict[str, jax.Array], tokenizer: Any) -> None:
  """Decodes the start of the first row: catches tokenizer and packing bugs at once."""
  try:
    local = {k: np.asarray(jax.device_get(v.addressable_shards[0].data)) for k, v in batch.items()}
    print("First batch, row 0:\n" + pipeline.describe_batch(local, tokenizer), flush=True)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Could not decode the first batch for display: %s", e)
