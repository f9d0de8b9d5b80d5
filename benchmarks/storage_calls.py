"""Cost of the storage calls the trainer adds (contended figures on shared machines: rerun quietly).

  python benchmarks/storage_calls.py [--n=50]

Times, on a local temporary folder and on gs:// through the local GCS emulator
(tests/gcs_emulator.py), side by side in alternating rounds: a lease renewal (done in a thread
every lease_stale_secs/4 and once before every checkpoint), a metric row (write_scalars), and a
forced metrics upload (done at every checkpoint on gs://; a no-op locally). Prints the median
milliseconds per call. The emulator is a single-threaded Python server on this machine, so its
figures say nothing about real GCS latency; they bound what the code adds around the calls.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=50)
  args = ap.parse_args()
  from tests.gcs_emulator import Emulator
  emu = Emulator()
  os.environ.update(emu.env)
  from dlm_jax import metrics
  from dlm_jax.run import lease as lease_lib
  where = {"local": tempfile.mkdtemp(), "gs": f"gs://bucket/bench-{uuid.uuid4().hex[:6]}"}
  leases, writers = {}, {}
  for k, wd in where.items():
    leases[k] = lease_lib.WorkdirLease(wd, stale_after_secs=600)
    leases[k].acquire()
    writers[k] = metrics.MetricWriter(wd, enabled=True, flush_secs=1e9)
  times = {(op, k): [] for op in ("renew", "row", "upload") for k in where}
  row = {f"m{i}": float(i) for i in range(15)}
  for i in range(args.n):
    for k in (("local", "gs") if i % 2 == 0 else ("gs", "local")):
      t = time.perf_counter(); leases[k].renew(); times["renew", k].append(time.perf_counter() - t)
      t = time.perf_counter(); writers[k].write_scalars(i + 1, row, "train/")
      times["row", k].append(time.perf_counter() - t)
      t = time.perf_counter(); writers[k].flush(force=True)
      times["upload", k].append(time.perf_counter() - t)
  print(f"median ms per call over {args.n} rounds (15 scalars per row; upload after {args.n} rows "
        "holds all of them)")
  for (op, k), v in times.items():
    print(f"  {op:>6} {k:>5}: {1e3 * statistics.median(v):8.2f} ms  (max {1e3 * max(v):.2f})")
  for k in where:
    leases[k].release(); writers[k].close()
  emu.stop()


if __name__ == "__main__":
  main()
