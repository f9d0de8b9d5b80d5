#!/usr/bin/env bash
# Run N CPU processes of the trainer on this machine, joined by jax.distributed over 127.0.0.1.
#
# This is the multi-host code path (process ids, per-process data shards, cross-process
# checkpointing) without a cluster: each process gets its own --process_id and a few fake CPU
# devices. Process 0's output is streamed here; the others write LOG_DIR/process_<i>.log. If one
# process fails the others are stopped; Ctrl-C (or SIGTERM) is forwarded to all of them, so the
# trainer saves before exiting.
#
#   launch/local_multiprocess.sh -n 2 -- --config=configs/did_tiny.py --workdir=/tmp/dlm_local
set -euo pipefail

PROG="$(basename "$0")"

usage() {
  cat <<EOF
Usage: ${PROG} [-n N] [options] -- TRAIN_FLAGS...

Starts N processes of  python -m MODULE --coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=I TRAIN_FLAGS...  with JAX_PLATFORMS=cpu and K fake CPU devices each.

Options:
  -n N, --num_processes=N       number of processes (default: 2)
  --devices_per_process=K       fake CPU devices per process (default: 4; so N*K devices in all)
  --port=PORT                   coordinator port on 127.0.0.1 (default: a free port)
  --log_dir=DIR                 logs of processes 1..N-1 (default: a new temporary directory)
  --python=PYTHON               interpreter (default: \$PYTHON, else python3)
  --module=MODULE               module to run (default: dlm_jax.train)
  --dry_run                     print the commands instead of running them
  -h, --help                    this help

Example:
  ${PROG} -n 2 -- --config=configs/did_tiny.py --workdir=/tmp/dlm_local
EOF
}

die() {
  echo "${PROG}: error: $*" >&2
  echo "Run '${PROG} --help' for usage." >&2
  exit 2
}

NUM_PROCESSES=2
DEVICES=4
PORT=""
LOG_DIR=""
PY="${PYTHON:-python3}"
MODULE="dlm_jax.train"
DRY_RUN=0
TRAIN_FLAGS=()

while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_FLAGS=("$@"); break ;;
    -n) (($# >= 2)) || die "-n needs a value"; NUM_PROCESSES="$2"; shift ;;
    --num_processes=*) NUM_PROCESSES="${1#*=}" ;;
    --devices_per_process=*) DEVICES="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --log_dir=*) LOG_DIR="${1#*=}" ;;
    --python=*) PY="${1#*=}" ;;
    --module=*) MODULE="${1#*=}" ;;
    --dry_run|--dry-run) DRY_RUN=1 ;;
    *) die "unexpected argument '$1' (trainer flags go after '--')" ;;
  esac
  shift
done

[[ "${NUM_PROCESSES}" =~ ^[1-9][0-9]*$ ]] || die "-n/--num_processes must be a positive integer (got '${NUM_PROCESSES}')"
[[ "${DEVICES}" =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process must be a positive integer (got '${DEVICES}')"
[[ -z "${PORT}" || "${PORT}" =~ ^[1-9][0-9]*$ ]] || die "--port must be a number (got '${PORT}')"
[[ -n "${MODULE}" ]] || die "--module must not be empty"
has_workdir=0
for flag in "${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}"; do
  case "${flag}" in --workdir=?*|--workdir) has_workdir=1 ;; esac
done
if [[ "${MODULE}" == "dlm_jax.train" ]] && ((!has_workdir)); then
  die "missing trainer flag --workdir=DIR (after '--'); all processes share it"
fi

if [[ -z "${PORT}" ]]; then
  if ((DRY_RUN)); then
    PORT=12355
  else
    PORT="$("${PY}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
      || die "could not pick a free port with ${PY}; pass --port=PORT"
    [[ "${PORT}" =~ ^[1-9][0-9]*$ ]] || die "could not pick a free port with ${PY} (got '${PORT}'); pass --port=PORT"
  fi
fi
if [[ -z "${LOG_DIR}" ]]; then
  if ((DRY_RUN)); then
    LOG_DIR="${TMPDIR:-/tmp}/dlm_jax_local.XXXXXX"
  else
    LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/dlm_jax_local.XXXXXX")"
  fi
elif ((!DRY_RUN)); then
  mkdir -p "${LOG_DIR}"
fi

quote_cmd() {
  local out="" word
  for word in "$@"; do
    out+="$(printf '%q' "${word}") "
  done
  echo "${out% }"
}

# Fills CMD with the command line of process $1.
build_cmd() {
  CMD=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${DEVICES}"
    "${PY}" -m "${MODULE}" "--coordinator_address=127.0.0.1:${PORT}"
    "--num_processes=${NUM_PROCESSES}" "--process_id=$1"
    "${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}")
}

if ((DRY_RUN)); then
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    build_cmd "${i}"
    if ((i == 0)); then
      echo "+ $(quote_cmd "${CMD[@]}")"
    else
      echo "+ $(quote_cmd "${CMD[@]}") > ${LOG_DIR}/process_${i}.log 2>&1"
    fi
  done
  exit 0
fi

echo "# ${NUM_PROCESSES} processes x ${DEVICES} CPU devices, coordinator 127.0.0.1:${PORT}, logs in ${LOG_DIR}" >&2
PIDS=()
stop_all() {  # stop_all SIGNAL: signal every process this script started that is still running
  local pid
  for pid in "${PIDS[@]+"${PIDS[@]}"}"; do
    kill -"$1" "${pid}" 2>/dev/null || true
  done
}
# shellcheck disable=SC2329  # invoked through `trap`
on_signal() {
  echo "# ${PROG}: signal received, forwarding SIGTERM to ${#PIDS[@]} processes" >&2
  stop_all TERM
  INTERRUPTED=1
}
INTERRUPTED=0
trap on_signal INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  build_cmd "${i}"
  if ((i == 0)); then
    "${CMD[@]}" &
  else
    "${CMD[@]}" >"${LOG_DIR}/process_${i}.log" 2>&1 &
  fi
  PIDS+=($!)
done

# Poll (portable to old bash, unlike `wait -n`) until every process has exited; on the first
# failure stop the others, which would otherwise block in a collective forever.
RCS=()
for ((i = 0; i < NUM_PROCESSES; i++)); do RCS+=(""); done
remaining=${NUM_PROCESSES}
failed=0
STOP_SENT_AT=-1
KILL_AFTER_S="${DLM_KILL_AFTER_S:-120}"
while ((remaining > 0)); do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    [[ -z "${RCS[i]}" ]] || continue
    if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
      if wait "${PIDS[i]}"; then RCS[i]=0; else RCS[i]=$?; fi
      remaining=$((remaining - 1))
      if ((RCS[i] != 0 && !failed && !INTERRUPTED)); then
        failed=1
        echo "# ${PROG}: process ${i} exited with status ${RCS[i]}; stopping the others" >&2
        stop_all TERM
        STOP_SENT_AT=${SECONDS}
      fi
    fi
  done
  if ((INTERRUPTED && STOP_SENT_AT < 0)); then STOP_SENT_AT=${SECONDS}; fi
  # Processes stuck in a collective may ignore SIGTERM: kill them after a grace period.
  if ((STOP_SENT_AT >= 0 && SECONDS - STOP_SENT_AT > KILL_AFTER_S)); then
    stop_all KILL
  fi
  ((remaining == 0)) || sleep 0.2
done

status=0
for ((i = 0; i < NUM_PROCESSES; i++)); do
  if ((RCS[i] != 0)); then
    status=1
    if ((i > 0)); then
      echo "# process ${i} exited with status ${RCS[i]}; last lines of ${LOG_DIR}/process_${i}.log:" >&2
      tail -n 20 "${LOG_DIR}/process_${i}.log" >&2 || true
    else
      echo "# process 0 exited with status ${RCS[i]}" >&2
    fi
  fi
done
if ((INTERRUPTED)); then
  echo "# interrupted; logs in ${LOG_DIR}" >&2
  exit 143
fi
((status == 0)) && echo "# all ${NUM_PROCESSES} processes finished; logs in ${LOG_DIR}" >&2
exit "${status}"
