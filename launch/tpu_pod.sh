#!/usr/bin/env bash
# Launch dlm-jax training on a Cloud TPU VM slice (single host or multi-host pod).
#
# The same training command runs on every worker of the slice (--worker=all); the trainer calls
# jax.distributed.initialize() itself on a TPU pod, writes to a shared gs:// workdir and resumes from
# the latest checkpoint there. Re-running this script after a preemption recreates (or reuses) the
# slice, reinstalls the package and starts the same command again, so training picks up where the
# last checkpoint left it. Run `launch/tpu_pod.sh --help` for the options; launch/README.md has
# worked examples.
set -euo pipefail

PROG="$(basename "$0")"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEFAULT_REPO_DIR="$(cd "${SCRIPT_DIR}/.." && pwd)"

usage() {
  cat <<EOF
Usage: ${PROG} --name=NAME --zone=ZONE --workdir=gs://BUCKET/RUN [options] [-- TRAIN_FLAGS...]

Creates or reuses a Cloud TPU VM slice, copies this repository to every worker, installs it and runs
  python -m dlm_jax.train --config=CONFIG --workdir=WORKDIR TRAIN_FLAGS...
on all workers at once. Worker 0's log is streamed here; every worker also keeps its own log in
LOG_DIR on its disk. Training runs detached on the workers (nohup), so closing this terminal does
not stop it; use --action=logs to re-attach and --action=stop to stop it (SIGTERM: it saves first).

Required:
  --name=NAME               TPU VM name (created if absent, reused if READY, recreated if PREEMPTED)
  --zone=ZONE               e.g. us-central2-b (v4), us-west4-a (v5e)
  --workdir=gs://B/RUN      shared checkpoint/log directory (must be gs://: every worker writes there)
                            (not needed for --action=create|setup|logs|stop|status|delete)
  --accelerator_type=TYPE   e.g. v4-32, v4-64, v5litepod-64, v5litepod-256 (only needed to create)

Options:
  --action=ACTION           up (default): create/reuse slice, setup, run, stream worker 0's log
                            create | setup | run | logs | stop | status | delete
  --config=PATH             config file relative to the repo root (default: configs/did_owt.py)
  --version=RUNTIME         TPU software version (default: tpu-ubuntu2204-base for v4,
                            v2-alpha-tpuv5-lite for v5litepod, v2-alpha-tpuv6e for v6e)
  --project=PROJECT         GCP project (default: gcloud's configured project)
  --spot                    create a Spot slice (cheaper, can be preempted at any time)
  --preemptible             create a (legacy) preemptible slice
  --create_flag=FLAG        extra flag for 'tpu-vm create', repeatable (e.g. --create_flag=--network=NET)
  --repo_dir=DIR            local repository to copy (default: ${DEFAULT_REPO_DIR})
  --remote_dir=DIR          where the repository lands on the workers (default: \$HOME/dlm-jax)
  --venv=DIR                virtualenv on the workers (default: \$HOME/dlm-jax-venv)
  --log_dir=DIR             log directory on the workers (default: \$HOME/dlm-jax-logs)
                            (remote paths are expanded on the workers and must not contain spaces)
  --extras=EXTRAS           pip extras to install besides gcp (default: tfds); gcp (the GCS client
                            libraries for the gs:// workdir) is always installed
  --jax_spec=SPEC           JAX requirement installed on the workers (default: jax[tpu]==0.10.2)
  --env=KEY=VALUE           environment variable for the trainer, repeatable
  --skip_setup              with --action=up: do not copy/install (slice already set up)
  --no_stream               with --action=up|run: start training and return without tailing the log
  --dry_run                 print every command (gcloud, tar) instead of running it
  -h, --help                this help

Everything after '--' is passed to the trainer unchanged, e.g. -- --config.optim.lr=1e-4

Example:
  ${PROG} --name=dlm-v4-64 --zone=us-central2-b --accelerator_type=v4-64 --spot \\
      --workdir=gs://my-bucket/did_owt --config=configs/did_owt.py -- \\
      --config.data.tfds_data_dir=gs://my-bucket/tfds --config.mesh.data=-1 --config.mesh.fsdp=4
EOF
}

die() {
  echo "${PROG}: error: $*" >&2
  echo "Run '${PROG} --help' for usage." >&2
  exit 2
}

# ---------------------------------------------------------------------------- arguments
NAME=""
ZONE=""
WORKDIR=""
ACCEL=""
ACTION="up"
CONFIG="configs/did_owt.py"
VERSION=""
PROJECT=""
SPOT=0
PREEMPTIBLE=0
REPO_DIR="${DEFAULT_REPO_DIR}"
# Remote paths are expanded by the workers' shell, so '$HOME' stays literal here.
# shellcheck disable=SC2016
REMOTE_DIR='$HOME/dlm-jax'
# shellcheck disable=SC2016
VENV='$HOME/dlm-jax-venv'
# shellcheck disable=SC2016
LOG_DIR='$HOME/dlm-jax-logs'
EXTRAS="tfds"
JAX_SPEC="jax[tpu]==0.10.2"
SKIP_SETUP=0
STREAM=1
DRY_RUN=0
CREATE_FLAGS=()
ENV_VARS=()
TRAIN_FLAGS=()

need_value() {  # need_value OPTION VALUE
  [[ -n "$2" ]] || die "option $1 needs a value (write $1=VALUE)"
}

while (($#)); do
  arg="$1"
  case "${arg}" in
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_FLAGS=("$@"); break ;;
    --dry_run|--dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --skip_setup) SKIP_SETUP=1 ;;
    --no_stream) STREAM=0 ;;
    --*=*)
      key="${arg%%=*}"
      val="${arg#*=}"
      need_value "${key}" "${val}"
      case "${key}" in
        --name) NAME="${val}" ;;
        --zone) ZONE="${val}" ;;
        --workdir) WORKDIR="${val}" ;;
        --accelerator_type|--accelerator-type) ACCEL="${val}" ;;
        --action) ACTION="${val}" ;;
        --config) CONFIG="${val}" ;;
        --version) VERSION="${val}" ;;
        --project) PROJECT="${val}" ;;
        --create_flag) CREATE_FLAGS+=("${val}") ;;
        --repo_dir) REPO_DIR="${val}" ;;
        --remote_dir) REMOTE_DIR="${val}" ;;
        --venv) VENV="${val}" ;;
        --log_dir) LOG_DIR="${val}" ;;
        --extras) EXTRAS="${val}" ;;
        --jax_spec) JAX_SPEC="${val}" ;;
        --env)
          [[ "${val}" == *=* ]] || die "--env expects KEY=VALUE, got '${val}'"
          ENV_VARS+=("${val}") ;;
        *) die "unknown option '${key}'" ;;
      esac ;;
    --name|--zone|--workdir|--accelerator_type|--accelerator-type|--action|--config|--version|\
    --project|--create_flag|--repo_dir|--remote_dir|--venv|--log_dir|--extras|--jax_spec|--env)
      # Also accept the '--opt VALUE' spelling.
      if (($# < 2)) || [[ "$2" == --* ]]; then die "option ${arg} needs a value"; fi
      shift
      set -- "${arg}=$1" "${@:2}"
      continue ;;
    *) die "unexpected argument '${arg}' (trainer flags go after '--')" ;;
  esac
  shift
done

case "${ACTION}" in
  up|create|setup|run|logs|stop|status|delete) ;;
  *) die "--action must be one of up, create, setup, run, logs, stop, status, delete (got '${ACTION}')" ;;
esac

missing=()
[[ -n "${NAME}" ]] || missing+=("--name")
[[ -n "${ZONE}" ]] || missing+=("--zone")
if [[ "${ACTION}" == "up" || "${ACTION}" == "run" ]]; then
  [[ -n "${WORKDIR}" ]] || missing+=("--workdir")
fi
if ((${#missing[@]})); then
  die "missing required argument(s): ${missing[*]}"
fi
if [[ -n "${WORKDIR}" && "${WORKDIR}" != gs://* ]]; then
  die "--workdir must be a gs:// path shared by all workers (got '${WORKDIR}')"
fi
if ((SPOT && PREEMPTIBLE)); then
  die "choose one of --spot and --preemptible"
fi
for kv in "${ENV_VARS[@]+"${ENV_VARS[@]}"}"; do
  [[ "${kv%%=*}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env name '${kv%%=*}' is not a valid variable name"
done
if [[ "${ACTION}" == "up" || "${ACTION}" == "setup" ]] && ((!SKIP_SETUP)); then
  [[ -f "${REPO_DIR}/setup.py" ]] || die "--repo_dir=${REPO_DIR} does not look like the dlm-jax repository (no setup.py)"
fi
if [[ "${ACTION}" == "up" || "${ACTION}" == "run" ]]; then
  if [[ ! -f "${REPO_DIR}/${CONFIG}" ]]; then
    if ((DRY_RUN)); then
      echo "${PROG}: warning: config file '${CONFIG}' not found under ${REPO_DIR}" >&2
    else
      die "config file '${CONFIG}' not found under ${REPO_DIR}"
    fi
  fi
fi

# The workdir is gs://, so the GCS client libraries (the [gcp] extra) are always installed.
case ",${EXTRAS}," in
  *,gcp,*) INSTALL_EXTRAS="${EXTRAS}" ;;
  ,,) INSTALL_EXTRAS="gcp" ;;
  *) INSTALL_EXTRAS="${EXTRAS},gcp" ;;
esac

if [[ -z "${VERSION}" ]]; then
  case "${ACCEL}" in
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) VERSION="tpu-ubuntu2204-base" ;;
  esac
fi

# ---------------------------------------------------------------------------- helpers
GCLOUD_TPU=(gcloud compute tpus tpu-vm)
COMMON_FLAGS=("--zone=${ZONE}")
[[ -z "${PROJECT}" ]] || COMMON_FLAGS+=("--project=${PROJECT}")

# Prints a command as a copy-pastable shell line (single-quoting words that need it).
print_cmd() {
  local out="+" word q="'"
  for word in "$@"; do
    if [[ "${word}" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=" ${word}"
    else
      out+=" ${q}${word//${q}/${q}\\${q}${q}}${q}"
    fi
  done
  echo "${out}"
}

# run CMD...: print it; execute it unless --dry_run.
run() {
  print_cmd "$@"
  if ((!DRY_RUN)); then
    "$@"
  fi
}

ssh_workers() {  # ssh_workers WORKER REMOTE_COMMAND
  run "${GCLOUD_TPU[@]}" ssh "${NAME}" "${COMMON_FLAGS[@]}" "--worker=$1" "--command=$2"
}

# Prints the slice state (READY, CREATING, PREEMPTED, ...) or NOT_FOUND.
slice_state() {
  local state
  if state="$("${GCLOUD_TPU[@]}" describe "${NAME}" "${COMMON_FLAGS[@]}" --format='value(state)' 2>/dev/null)"; then
    echo "${state:-UNKNOWN}"
  else
    echo "NOT_FOUND"
  fi
}

create_slice() {
  [[ -n "${ACCEL}" ]] || die "slice '${NAME}' does not exist; pass --accelerator_type (e.g. v4-64) to create it"
  local flags=("--accelerator-type=${ACCEL}" "--version=${VERSION}")
  if ((SPOT)); then flags+=("--spot"); fi
  if ((PREEMPTIBLE)); then flags+=("--preemptible"); fi
  run "${GCLOUD_TPU[@]}" create "${NAME}" "${COMMON_FLAGS[@]}" "${flags[@]}" \
    "${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"}"
}

delete_slice() {
  run "${GCLOUD_TPU[@]}" delete "${NAME}" "${COMMON_FLAGS[@]}" --quiet
}

# Creates the slice if absent, recreates it if preempted, reuses it if READY.
# Sets FRESH_SLICE=1 when the workers are new (so setup is required).
FRESH_SLICE=0
ensure_slice() {
  local state
  if ((DRY_RUN)); then
    print_cmd "${GCLOUD_TPU[@]}" describe "${NAME}" "${COMMON_FLAGS[@]}" "--format=value(state)"
    echo "# dry run: assuming slice '${NAME}' does not exist yet"
    state="NOT_FOUND"
  else
    state="$(slice_state)"
  fi
  echo "# slice ${NAME}: ${state}"
  case "${state}" in
    READY) return 0 ;;
    NOT_FOUND) create_slice ;;
    PREEMPTED|TERMINATED|STOPPED|SUSPENDED|FAILED|UNKNOWN)
      echo "# slice ${NAME} is ${state}: deleting and recreating it (the run resumes from ${WORKDIR:-its workdir})"
      delete_slice
      create_slice ;;
    *) die "slice ${NAME} is ${state}; wait until it is READY (or delete it) and run again" ;;
  esac
  FRESH_SLICE=1
}

# Copies the working tree (uncommitted changes included) to every worker and installs it.
# (stop_snippet is defined below; bash resolves it when setup_workers runs.)
setup_workers() {
  local tmp tarball
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/dlm_jax_launch.XXXXXX")"
  tarball="${tmp}/dlm-jax.tar.gz"
  # shellcheck disable=SC2064  # expand now: the path is fixed
  trap "rm -rf '${tmp}'" EXIT
  run tar -C "${REPO_DIR}" -czf "${tarball}" \
    --exclude=./.git --exclude=./.venv --exclude='*.egg-info' --exclude='__pycache__' \
    --exclude=./workdirs --exclude=./.cache --exclude='.pytest_cache' .
  run "${GCLOUD_TPU[@]}" scp "${tarball}" "${NAME}:dlm-jax.tar.gz" "${COMMON_FLAGS[@]}" --worker=all
  local remote
  # A trainer still running from the old copy is stopped first (SIGTERM: it saves a checkpoint).
  remote="set -euo pipefail; $(stop_snippet) "
  remote+="rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf \$HOME/dlm-jax.tar.gz -C ${REMOTE_DIR}; "
  remote+="[ -x ${VENV}/bin/python ] || python3 -m venv ${VENV}; "
  remote+="${VENV}/bin/pip install -q -U pip; "
  remote+="${VENV}/bin/pip install -q -e \"${REMOTE_DIR}[${INSTALL_EXTRAS}]\" \"${JAX_SPEC}\""
  remote+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html; "
  remote+="${VENV}/bin/python -c 'import jax, dlm_jax; print(\"worker ok: jax\", jax.__version__)'"
  ssh_workers all "${remote}"
}

# The command every worker runs (identical on all of them).
train_command() {
  local cmd="env" kv flag
  for kv in "${ENV_VARS[@]+"${ENV_VARS[@]}"}"; do
    cmd+=" ${kv%%=*}=$(printf '%q' "${kv#*=}")"
  done
  cmd+=" ${VENV}/bin/python -m dlm_jax.train --config=$(printf '%q' "${CONFIG}") --workdir=$(printf '%q' "${WORKDIR}")"
  for flag in "${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}"; do
    cmd+=" $(printf '%q' "${flag}")"
  done
  echo "${cmd}"
}

# Stops a training process left over from an earlier launch on this slice (SIGTERM so it saves),
# then starts the trainer detached on every worker, logging to LOG_DIR/train.log on each worker.
start_training() {
  local remote
  remote="set -euo pipefail; mkdir -p ${LOG_DIR}; cd ${REMOTE_DIR}; "
  remote+="$(stop_snippet) "
  remote+="echo \"=== \$(date -u +%FT%TZ) start on \$(hostname)\" >> ${LOG_DIR}/train.log; "
  remote+="nohup setsid $(train_command) >> ${LOG_DIR}/train.log 2>&1 < /dev/null & "
  remote+="echo \$! > ${LOG_DIR}/train.pid; echo \"started pid \$! on \$(hostname)\""
  ssh_workers all "${remote}"
}

# Shell snippet (run on a worker): SIGTERM the pid in train.pid, wait up to 5 minutes, then SIGKILL.
stop_snippet() {
  local pidfile="${LOG_DIR}/train.pid"
  printf '%s' "if [ -f ${pidfile} ] && kill -0 \"\$(cat ${pidfile})\" 2>/dev/null; then " \
    "p=\"\$(cat ${pidfile})\"; echo \"stopping trainer pid \$p on \$(hostname)\"; kill -TERM \"\$p\"; " \
    "for _ in \$(seq 300); do kill -0 \"\$p\" 2>/dev/null || break; sleep 1; done; " \
    "if kill -0 \"\$p\" 2>/dev/null; then kill -KILL \"\$p\"; fi; fi; rm -f ${pidfile};"
}

stop_training() {
  ssh_workers all "set -uo pipefail; $(stop_snippet)"
}

stream_logs() {
  echo "# streaming worker 0's log (Ctrl-C detaches; training keeps running)"
  local pidfile="${LOG_DIR}/train.pid"
  ssh_workers 0 "if [ -f ${pidfile} ]; then tail -n +1 --pid=\"\$(cat ${pidfile})\" -F ${LOG_DIR}/train.log; else tail -n 200 ${LOG_DIR}/train.log; fi"
}

# ---------------------------------------------------------------------------- main
if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found on PATH (install the Google Cloud SDK, or use --dry_run to see the commands)"
fi

case "${ACTION}" in
  create) ensure_slice ;;
  setup) setup_workers ;;
  run)
    start_training
    if ((STREAM)); then stream_logs; fi ;;
  logs) stream_logs ;;
  stop) stop_training ;;
  status) run "${GCLOUD_TPU[@]}" describe "${NAME}" "${COMMON_FLAGS[@]}" ;;
  delete) delete_slice ;;
  up)
    ensure_slice
    if ((FRESH_SLICE)) || ((!SKIP_SETUP)); then
      setup_workers
    fi
    start_training
    if ((STREAM)); then stream_logs; fi ;;
esac
exit 0
