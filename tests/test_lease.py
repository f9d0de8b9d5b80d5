"""One writer per workdir (issue 18): the lease on local disk and on gs:// (the GCS emulator).

Unit tests of `dlm_jax.run.lease` on both storages, then the trainer itself: a second trainer on a
leased workdir stops at once naming the holder; a trainer killed with -9 never blocks its own
restart on the same host.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from dlm_jax.run import lease as lease_lib
from tests.tiny import TINY_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "gcs"])
def workdir(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "run")
  request.getfixturevalue("gcs_emulator")
  return f"gs://bucket/lease-{uuid.uuid4().hex[:8]}/run"


def _read(lease):
  got = lease._store.read()  # pylint: disable=protected-access
  return got[0] if got else None


def test_second_holder_is_refused_with_the_holder_named(workdir):
  a = lease_lib.WorkdirLease(workdir, stale_after_secs=60)
  a.acquire()
  b = lease_lib.WorkdirLease(workdir, stale_after_secs=60)
  b._why_free = lambda content, takeover: "--takeover was given" if takeover else None  # another host
  with pytest.raises(lease_lib.LeaseHeldError) as e:
    b.acquire()
  msg = str(e.value)
  held = _read(a)
  for piece in (f"host {held['host']}", f"process id {os.getpid()}", "started ",
                "last renewal ", "--takeover", "goes stale 60 s after its last renewal"):
    assert piece in msg, (piece, msg)
  a.renew()  # still the holder
  a.release()
  assert _read(a) is None
  b.acquire()  # free now
  b.release()


def test_takeover_dispossesses_the_holder(workdir):
  a = lease_lib.WorkdirLease(workdir, stale_after_secs=60)
  a.acquire()
  b = lease_lib.WorkdirLease(workdir, stale_after_secs=60)
  b.acquire(takeover=True)
  with pytest.raises(lease_lib.LeaseLostError) as e:
    a.renew()
  assert "taken over" in str(e.value) and "Stopping without saving" in str(e.value)
  a.release()  # must not remove the new holder's lease
  assert _read(b)["token"] == b._content["token"]  # pylint: disable=protected-access
  b.renew()
  b.release()


def test_a_stale_lease_is_taken_without_asking(workdir):
  a = lease_lib.WorkdirLease(workdir, stale_after_secs=0.5)
  a.acquire()  # never renewed: as if its host vanished
  b = lease_lib.WorkdirLease(workdir, stale_after_secs=60)
  b._why_free = lambda content, takeover, f=b._why_free: (  # pylint: disable=protected-access
      f(dict(content, host="another-host"), takeover))  # the holder ran elsewhere
  with pytest.raises(lease_lib.LeaseHeldError):
    b.acquire()
  time.sleep(0.7)
  b.acquire()
  with pytest.raises(lease_lib.LeaseLostError):
    a.renew()
  b.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(workdir):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  a = lease_lib.WorkdirLease(workdir, stale_after_secs=3600)
  a.acquire()
  # Rewrite the holder as the finished process (same host, fresh renewal).
  content = dict(_read(a), pid=dead.pid)
  a._generation = a._store.replace(content, a._generation)  # pylint: disable=protected-access
  b = lease_lib.WorkdirLease(workdir, stale_after_secs=3600)
  b.acquire()
  assert _read(b)["pid"] == os.getpid() and _read(b)["token"] != content["token"]
  b.release()


@pytest.mark.parametrize("stale_first", [False, True])
def test_racing_trainers_exactly_one_wins(workdir, stale_first):
  """Six contenders read the lease at once (free, or stale) and all try to take it: the
  create-if-absent / compare-and-swap lets exactly one through."""
  n = 6
  if stale_first:
    old = lease_lib.WorkdirLease(workdir, stale_after_secs=0.2)
    old.acquire()
    old_holder = dict(_read(old), host="another-host")
    old._store.replace(old_holder, old._generation)  # pylint: disable=protected-access
    time.sleep(0.4)
  barrier = threading.Barrier(n)
  won, refused = [], []

  def contender(i):
    lease = lease_lib.WorkdirLease(workdir, stale_after_secs=60)
    read = lease._store.read  # pylint: disable=protected-access

    def slow_read():  # everyone reads before anyone writes: the widest race
      got = read()
      time.sleep(0.5)
      return got
    lease._store.read = slow_read  # pylint: disable=protected-access
    barrier.wait()
    try:
      lease.acquire()
      won.append(i)
    except lease_lib.LeaseHeldError:
      refused.append(i)

  threads = [threading.Thread(target=contender, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert len(won) == 1 and len(refused) == n - 1, (won, refused)


def test_lease_renews_itself_in_the_background(workdir):
  a = lease_lib.WorkdirLease(workdir, stale_after_secs=1.2)  # renews every 0.3 s
  a.acquire()
  first = _read(a)["renewed"]
  a.start_renewing()
  time.sleep(1.0)
  assert _read(a)["renewed"] > first and a.held
  a.release()
  assert _read(a) is None


def test_a_lease_that_cannot_be_renewed_is_given_up(gcs_emulator):
  """GCS refuses the renewals (here 403): the holder keeps trying until its lease would look
  stale to others, then counts it as lost (the trainer then stops without saving)."""
  wd = f"gs://bucket/lease-{uuid.uuid4().hex[:8]}/run"
  a = lease_lib.WorkdirLease(wd, stale_after_secs=1.0)
  a.acquire()
  gcs_emulator.set_fault(r"lease\.json$", status=403)
  try:
    with pytest.raises(Exception) as first:  # a storage error: retried at the next renewal
      a.renew()
    assert not isinstance(first.value, lease_lib.LeaseLostError) and a.held
    time.sleep(1.0)
    with pytest.raises(lease_lib.LeaseLostError, match="Could not renew the workdir lease"):
      a.renew()
    assert not a.held
  finally:
    gcs_emulator.clear_fault()


# -- the trainer -----------------------------------------------------------------------------------
def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "dlm_jax.train", "--config=configs/mdlm_tiny.py",
          f"--workdir={workdir}", *TINY_FLAGS, "--config.train.num_steps=100000",
          "--config.train.log_every=1", "--config.train.print_batch=false",
          "--config.train.ckpt_every=5", *extra]


def _env(tmp_path):
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
              JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _wait_for_step(proc, step, timeout=300):
  deadline = time.time() + timeout
  for line in proc.stdout:
    if line.startswith("step") and int(line.split()[1].split("/")[0]) >= step:
      return
    assert time.time() < deadline, "the trainer did not reach the step in time"
  raise AssertionError(f"the trainer ended before step {step}: rc={proc.wait()}")


def test_second_trainer_stops_and_a_killed_one_never_blocks_its_restart(tmp_path):
  wd, env = str(tmp_path / "run"), _env(tmp_path)
  first = subprocess.Popen(_train_cmd(wd), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
  try:
    _wait_for_step(first, 6)
    t0 = time.time()
    second = subprocess.run(_train_cmd(wd), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    err = second.stderr.strip().splitlines()[-1]
    assert err.startswith("ERROR: Another trainer holds the workdir"), err
    assert f"process id {first.pid}" in err and "--takeover" in err, err
    assert first.poll() is None  # the holder trains on
    first.kill()  # -9: no release, a fresh renewal in the lease
    first.wait(timeout=60)
  finally:
    if first.poll() is None:
      first.kill()
  held = json.load(open(os.path.join(wd, "lease.json")))
  assert held["pid"] == first.pid and time.time() - held["renewed"] < held["stale_after_secs"]

  # Same host, holder process gone: the restart takes the lease at once and resumes.
  again = subprocess.run(_train_cmd(wd, "--stop_after_steps=2"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resumed from checkpoint step" in again.stdout
  assert f"process {first.pid} no longer runs on this host" in again.stderr
  assert not os.path.exists(os.path.join(wd, "lease.json"))  # released at the end
  print(f"second trainer refused in {time.time() - t0:.1f} s")
