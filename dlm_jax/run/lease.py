"""One writer per workdir: a lease the trainer takes before it writes and renews while it runs.

The lease is `<workdir>/lease.json`: who holds it (host, process id, boot id, start time, a random
token) and when it was last renewed. Every change is a compare-and-swap on the object's generation,
so two trainers can never both believe they hold it:

- local disk: the file is created with O_CREAT | O_EXCL; renewals, take-overs and the release
  compare the generation stored in the file under an exclusive flock of `lease.json.lock`;
- gs://: the GCS object's own generation, through google-cloud-storage preconditions
  (`if_generation_match=0` to create, `=N` to renew, take over or delete).

A second trainer on a leased workdir stops at once (`LeaseHeldError` names the holder and how to
take over). It takes the lease without asking when the holder is gone: its last renewal is older
than the stale time the holder wrote into the lease (a crashed or preempted run never blocks its
own restart for longer than that), or the holder ran on this very host and its process no longer
exists (or the host rebooted). `takeover=True` (`train --takeover`) takes it in any case; the
dispossessed trainer notices at its next renewal or save and stops without writing anything more.

Read-only commands (evaluate, sample, `dlm_jax.load`) never touch the lease.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from dlm_jax import paths

LEASE_FILE = "lease.json"


class LeaseError(RuntimeError):
  """The workdir lease cannot be taken or was lost; the message says what to do."""


class LeaseHeldError(LeaseError):
  """Another live trainer holds the lease."""


class LeaseLostError(LeaseError):
  """This trainer's lease was taken over (or could not be renewed) while it ran."""


class _Conflict(Exception):
  """A compare-and-swap lost: the lease changed since it was read."""


def _now() -> float:
  return time.time()


def _iso(t: float | None) -> str:
  if not t:
    return "?"
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
      return f.read().strip()
  except OSError:
    return ""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  except OSError:
    return True
  return True


# -- storage: read / create / replace / delete with a generation ---------------------------------
class _LocalStore:
  """lease.json on a local (or NFS) disk; the generation is a counter inside the file."""

  def __init__(self, path: str):
    self.path = path
    self._lock_path = path + ".lock"

  @contextlib.contextmanager
  def _locked(self) -> Iterator[None]:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        import fcntl  # pylint: disable=g-import-not-at-top
        fcntl.flock(fd, fcntl.LOCK_EX)
      except ImportError:  # pragma: no cover  (no flock: O_EXCL still guards creation)
        pass
      yield
    finally:
      os.close(fd)  # closing drops the flock

  def _read_unlocked(self) -> tuple[dict[str, Any], int] | None:
    try:
      with open(self.path, encoding="utf-8") as f:
        content = json.load(f)
    except FileNotFoundError:
      return None
    except ValueError:
      content = {}  # cut short by a crash while being written: a lease nobody renews
    return content, int(content.get("generation", 1))

  def read(self) -> tuple[dict[str, Any], int] | None:
    with self._locked():
      return self._read_unlocked()

  def create(self, content: dict[str, Any]) -> int:
    with self._locked():
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        raise _Conflict() from None
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(dict(content, generation=1), f)
      return 1

  def replace(self, content: dict[str, Any], generation: int) -> int:
    with self._locked():
      cur = self._read_unlocked()
      if cur is None or cur[1] != generation:
        raise _Conflict()
      paths.write_text(self.path, json.dumps(dict(content, generation=generation + 1)))
      return generation + 1

  def delete(self, generation: int) -> None:
    with self._locked():
      cur = self._read_unlocked()
      if cur is None or cur[1] != generation:
        raise _Conflict()
      os.remove(self.path)


class _GcsStore:
  """lease.json as a GCS object; the generation is the object's generation."""

  def __init__(self, path: str, retry_secs: float = 30.0):
    paths.require_gcs(path)
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    from google.cloud.storage.retry import DEFAULT_RETRY  # pylint: disable=g-import-not-at-top
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    self._exc = exceptions
    bucket, _, name = path[len("gs://"):].partition("/")
    self.path = path
    self._bucket = storage.Client().bucket(bucket)
    self._name = name
    # Transient errors are retried, but never for longer than a renewal interval: a lease call
    # must not hang the trainer through an outage (its default is 120 s).
    self._kw = dict(retry=DEFAULT_RETRY.with_timeout(retry_secs), timeout=retry_secs)

  def read(self) -> tuple[dict[str, Any], int] | None:
    for _ in range(5):
      blob = self._bucket.get_blob(self._name, **self._kw)
      if blob is None:
        return None
      try:
        data = blob.download_as_bytes(if_generation_match=blob.generation, **self._kw)
      except (self._exc.PreconditionFailed, self._exc.NotFound):
        continue  # changed between the two calls: read again
      try:
        content = json.loads(data)
      except ValueError:
        content = {}
      return content, int(blob.generation)
    raise LeaseError(f"{self.path} keeps changing while being read.")

  def _upload(self, content: dict[str, Any], generation: int) -> int:
    blob = self._bucket.blob(self._name)
    try:
      blob.upload_from_string(json.dumps(content), content_type="application/json",
                              if_generation_match=generation, **self._kw)
    except self._exc.PreconditionFailed:
      raise _Conflict() from None
    return int(blob.generation)

  def create(self, content: dict[str, Any]) -> int:
    return self._upload(content, 0)

  def replace(self, content: dict[str, Any], generation: int) -> int:
    return self._upload(content, generation)

  def delete(self, generation: int) -> None:
    try:
      self._bucket.blob(self._name).delete(if_generation_match=generation, **self._kw)
    except (self._exc.PreconditionFailed, self._exc.NotFound):
      raise _Conflict() from None


def _store(path: str, retry_secs: float = 30.0):
  if paths.is_gcs(path):
    return _GcsStore(path, retry_secs)
  if paths.is_remote(path):
    raise LeaseError(f"{path}: a workdir lease works on local disks and gs:// only.")
  return _LocalStore(os.path.abspath(path))


# -- the lease -------------------------------------------------------------------------------------
def describe_holder(content: dict[str, Any], now: float | None = None) -> str:
  """'host H, process id P, started ..., last renewal ... (N s ago)' of a lease's content."""
  now = _now() if now is None else now
  renewed = content.get("renewed")
  ago = f" ({now - renewed:.0f} s ago)" if renewed else ""
  return (f"host {content.get('host', '?')}, process id {content.get('pid', '?')}, started "
          f"{_iso(content.get('started'))}, last renewal {_iso(renewed)}{ago}")


class WorkdirLease:
  """The lease on one workdir, held by this process (the trainer's process 0)."""

  def __init__(self, workdir: str, stale_after_secs: float = 300.0):
    if stale_after_secs <= 0:
      raise ValueError(f"stale_after_secs must be > 0, got {stale_after_secs}.")
    self.workdir = workdir
    self.path = paths.join(paths.absolute(workdir), LEASE_FILE)
    self.stale_after = float(stale_after_secs)
    # Renew often enough that two renewals can fail before the lease looks stale to others.
    self.renew_every = max(min(self.stale_after / 4.0, 60.0), 0.2)
    self._store = _store(self.path, retry_secs=max(min(self.renew_every, 30.0), 5.0))
    self._generation: int | None = None
    self._content: dict[str, Any] = {}
    self._last_ok = 0.0
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._lock = threading.Lock()
    self.lost: str | None = None  # why the lease was lost (set by the renewal thread)

  @property
  def held(self) -> bool:
    return self._generation is not None and self.lost is None

  def _mine(self, started: float) -> dict[str, Any]:
    now = _now()
    return dict(host=socket.gethostname(), pid=os.getpid(), boot_id=_boot_id(), started=started,
                renewed=now, stale_after_secs=self.stale_after, token=uuid.uuid4().hex,
                workdir=self.workdir)

  def _why_free(self, content: dict[str, Any], takeover: bool) -> str | None:
    """Why a lease held by someone else may be taken now (None: it may not)."""
    if takeover:
      return "--takeover was given"
    now = _now()
    renewed = content.get("renewed")
    stale = float(content.get("stale_after_secs", self.stale_after))
    if not isinstance(renewed, (int, float)):
      return "the lease file is unreadable"
    if now - renewed > stale:
      return f"its last renewal was {now - renewed:.0f} s ago (stale after {stale:.0f} s)"
    if content.get("host") == socket.gethostname():
      boot = content.get("boot_id")
      if boot and _boot_id() and boot != _boot_id():
        return "this host rebooted since"
      pid = content.get("pid")
      if isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
        return f"process {pid} no longer runs on this host"
    return None

  def acquire(self, takeover: bool = False) -> None:
    """Takes the lease or raises LeaseHeldError naming the holder and how to take over."""
    started = _now()
    for _ in range(10):
      mine = self._mine(started)
      cur = self._store.read()
      try:
        if cur is None:
          gen = self._store.create(mine)
        else:
          content, generation = cur
          why = self._why_free(content, takeover)
          if why is None:
            raise LeaseHeldError(
                f"Another trainer holds the workdir {self.workdir}: {describe_holder(content)} "
                f"(lease {self.path}). Two trainers on one workdir would interleave checkpoints "
                "and metrics. Stop the other trainer or use another --workdir; to take over "
                "anyway, re-run with --takeover (the other trainer then stops without saving "
                "again). A lease that is not renewed goes stale "
                f"{float(content.get('stale_after_secs', self.stale_after)):.0f} s after its last "
                "renewal and is then taken over without --takeover.")
          gen = self._store.replace(mine, generation)
          logging.warning("Took over the workdir lease of %s from %s: %s.", self.workdir,
                          describe_holder(content), why)
      except _Conflict:
        continue  # someone else moved first: look again
      with self._lock:
        self._generation, self._content, self._last_ok = gen, mine, _now()
      return
    raise LeaseError(f"Could not take the lease {self.path}: it keeps changing (several trainers "
                     "starting at once?).")

  def renew(self) -> None:
    """Renews now; raises LeaseLostError when another trainer has taken the lease."""
    if self.lost is not None:
      raise LeaseLostError(self.lost)
    if self._generation is None:
      raise LeaseError("renew() before acquire().")
    with self._lock:
      content = dict(self._content, renewed=_now())
      try:
        gen = self._store.replace(content, self._generation)
      except _Conflict:
        self.lost = self._lost_message()
        raise LeaseLostError(self.lost) from None
      except Exception as e:  # pylint: disable=broad-except  # storage trouble: retried later
        if _now() - self._last_ok > 0.9 * self.stale_after:
          self.lost = (f"Could not renew the workdir lease {self.path} for "
                       f"{_now() - self._last_ok:.0f} s ({type(e).__name__}: {e}); another "
                       "trainer may have taken over. Stopping without saving again.")
          raise LeaseLostError(self.lost) from e
        raise
      self._generation, self._content, self._last_ok = gen, content, _now()

  def _lost_message(self) -> str:
    try:
      cur = self._store.read()
    except Exception:  # pylint: disable=broad-except
      cur = None
    holder = describe_holder(cur[0]) if cur else "nobody (the lease file was removed)"
    return (f"The workdir lease of {self.workdir} was taken over while this trainer ran; it is "
            f"now held by {holder}. Stopping without saving again, so the two trainers never "
            "interleave checkpoints or metrics.")

  def _renew_loop(self) -> None:
    while not self._stop.wait(self.renew_every):
      try:
        self.renew()
      except LeaseLostError as e:
        logging.error("%s", e)
        return
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Renewing the workdir lease %s failed (%s: %s); retrying in %.0f s.",
                        self.path, type(e).__name__, e, self.renew_every)

  def start_renewing(self) -> None:
    """Renews in a daemon thread every `renew_every` seconds until release()."""
    if self._thread is None:
      self._stop.clear()
      self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                      name="dlm_jax-workdir-lease")
      self._thread.start()

  def release(self) -> None:
    """Stops renewing and removes the lease if this process still holds it."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=30)
      self._thread = None
    with self._lock:
      if self._generation is None or self.lost is not None:
        return
      try:
        self._store.delete(self._generation)
      except _Conflict:
        pass
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not remove the workdir lease %s (%s); it goes stale by itself.",
                        self.path, e)
      self._generation = None
