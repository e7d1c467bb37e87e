# Sourced by the sslfw sbatch scripts. `sslfw_run VERB ARGS...` starts one `accelerate launch` per Slurm task
# (one task per node), waits for it, forwards warning signals, and requeues the job when sslfw saved on request.
# Settings (environment variables, all optional; sbatch passes the submitting shell's environment on):
#   SSLFW_ROOT            the repository (default: the submit directory); slurm/common.sh is read from here
#   SSLFW_VENV            a virtualenv to activate (default: $SSLFW_ROOT/.venv when it exists)
#   SSLFW_PROCS_PER_NODE  processes per node (default: the node's GPUs, $SLURM_GPUS_ON_NODE, else 1)
#   SSLFW_CPU=1           run the processes on the CPU over gloo (tests, demos)
#   SSLFW_ACCELERATE_CONFIG  accelerate config file (default: launch/multi_gpu.yaml, or launch/cpu_2proc.yaml)
#   SSLFW_MASTER_ADDR / SSLFW_PORT  rendezvous host and port (default: the first node; 20000 + job id % 20000)
#   SSLFW_MAX_REQUEUES    stop requeueing after this many restarts (default 20)
#   SSLFW_CRASH_REQUEUES  requeues of a job whose process died (no exit code, or 1 from its peers; default 1)
#   SSLFW_SAVE_GRACE      seconds the launcher waits for workers to save after a signal (default 240)
#   SSLFW_STATE_DIR       where the exit code of each attempt is left (default: $SLURM_SUBMIT_DIR/.sslfw-slurm);
#                         must be visible from every node, like the run directory
set -uo pipefail

: "${SSLFW_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"
if [[ -z "${SSLFW_VENV:-}" && -f "$SSLFW_ROOT/.venv/bin/activate" ]]; then SSLFW_VENV="$SSLFW_ROOT/.venv"; fi
if [[ -n "${SSLFW_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$SSLFW_VENV/bin/activate" || { echo "sslfw: cannot activate SSLFW_VENV=$SSLFW_VENV" >&2; exit 2; }
fi
command -v accelerate >/dev/null || { echo "sslfw: accelerate not found; set SSLFW_VENV to the project's venv" >&2; exit 2; }

# Compute nodes rarely reach the internet: W&B writes offline; upload later with `wandb sync RUN_DIR/wandb/offline-run-*`.
export WANDB_MODE="${WANDB_MODE:-offline}"
# Without this the launcher dies on SIGUSR1 and leaves its workers orphaned (docs/NOTES.md, Distributed training).
export PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# The launcher SIGKILLs its workers this long after forwarding a signal (torch's default, 30 s, can be shorter than a
# step plus a checkpoint); keep it under the --signal warning (300 s in the scripts).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SSLFW_SAVE_GRACE:-240}"
SSLFW_STATE_DIR="${SSLFW_STATE_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/.sslfw-slurm}"
mkdir -p "$SSLFW_STATE_DIR"
export SSLFW_EXIT_FILE="$SSLFW_STATE_DIR/exit-${SLURM_JOB_ID}.txt"
if [[ "${SSLFW_CPU:-0}" == 1 ]]; then
    export ACCELERATE_USE_CPU=true
    : "${SSLFW_ACCELERATE_CONFIG:=$SSLFW_ROOT/launch/cpu_2proc.yaml}"
fi
: "${SSLFW_ACCELERATE_CONFIG:=$SSLFW_ROOT/launch/multi_gpu.yaml}"
: "${SSLFW_PROCS_PER_NODE:=${SLURM_GPUS_ON_NODE:-1}}"
# A CPU node reports SLURM_GPUS_ON_NODE=0: it still runs one process (and 0 would divide by zero below).
case $SSLFW_PROCS_PER_NODE in
    ''|*[!0-9]*) echo "sslfw: SSLFW_PROCS_PER_NODE=$SSLFW_PROCS_PER_NODE: give a whole number of processes per node" >&2; exit 2 ;;
    0) SSLFW_PROCS_PER_NODE=1 ;;
esac
: "${SSLFW_MASTER_ADDR:=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
: "${SSLFW_PORT:=$((20000 + SLURM_JOB_ID % 20000))}"
export SSLFW_ACCELERATE_CONFIG SSLFW_PROCS_PER_NODE SSLFW_MASTER_ADDR SSLFW_PORT
# The processes of a node share its task's CPUs: one share of threads each, not all of them each.
_threads=$(( ${SLURM_CPUS_PER_TASK:-1} / SSLFW_PROCS_PER_NODE ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( _threads > 0 ? _threads : 1 ))}"

sslfw_run() {
    local machines=$SLURM_NTASKS  # one launcher per task; the scripts ask for one task per node
    echo "[sslfw-slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
         "$machines launcher(s) x $SSLFW_PROCS_PER_NODE process(es), rendezvous $SSLFW_MASTER_ADDR:$SSLFW_PORT: sslfw $*"
    rm -f "$SSLFW_EXIT_FILE"
    # Single quotes: SLURM_PROCID is expanded inside each task, not here. One node: static rendezvous on this job's
    # port (c10d without an endpoint would take torch's fixed 29400, which two jobs on one node, such as the array
    # tasks of slurm/pipeline_grid.sh, would share). Several nodes: task 0's launcher hosts the c10d store;
    # the others wait until it listens (accelerate refuses to start task 0 if its port is taken first, which
    # happens when launchers share a host, as in the tests).
    # shellcheck disable=SC2016
    srun --export=ALL --kill-on-bad-exit=1 bash -c 'if [[ $SLURM_PROCID != 0 ]]; then
            for _ in $(seq 600); do (exec 3<>"/dev/tcp/$SSLFW_MASTER_ADDR/$SSLFW_PORT") 2>/dev/null && break; sleep 1; done
        fi
        exec accelerate launch --config_file "$SSLFW_ACCELERATE_CONFIG" \
        --num_processes $(( SLURM_NTASKS * SSLFW_PROCS_PER_NODE )) --num_machines "$SLURM_NTASKS" \
        --machine_rank "$SLURM_PROCID" --rdzv_backend "$([[ $SLURM_NTASKS -gt 1 ]] && echo c10d || echo static)" \
        --main_process_ip "$SSLFW_MASTER_ADDR" \
        --main_process_port "$SSLFW_PORT" -m sslfw "$@"' sslfw "$@" &
    local pid=$! rc
    # --signal=B:USR1@N warns only this shell; a bash trap runs between `wait`s, so the step runs in the background.
    trap 'echo "[sslfw-slurm] USR1: asking sslfw to save and stop"; kill -USR1 $pid' USR1
    trap 'echo "[sslfw-slurm] TERM: asking sslfw to save and stop"; kill -TERM $pid' TERM
    while :; do
        wait "$pid"; rc=$?
        kill -0 "$pid" 2>/dev/null || break  # wait returned because of a trap: keep waiting for the step
    done
    trap - USR1 TERM
    local code
    code=$(cat "$SSLFW_EXIT_FILE" 2>/dev/null) || code=""
    echo "[sslfw-slurm] step finished: srun rc=$rc, sslfw exit code ${code:-unknown (no $SSLFW_EXIT_FILE)}"
    local id=$SLURM_JOB_ID
    [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]] && id="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    if [[ "$code" == 75 ]]; then
        if (( ${SLURM_RESTART_COUNT:-0} >= ${SSLFW_MAX_REQUEUES:-20} )); then
            echo "[sslfw-slurm] saved, but SSLFW_MAX_REQUEUES=${SSLFW_MAX_REQUEUES:-20} reached; resubmit to go on" >&2
            exit 75
        fi
        echo "[sslfw-slurm] saved; requeueing job $id: it resumes from the newest checkpoint"
        scontrol requeue "$id"
        exit 0
    fi
    # A process that died (killed, out of memory, a lost node) leaves no exit code, or its peers stop on the broken
    # collective with 1: requeue to resume from the newest checkpoint, SSLFW_CRASH_REQUEUES times per job (a fault
    # that repeats at the same step is not worth more); bad input (2) and non-finite losses (3) are not retried.
    if [[ $rc != 0 && ( -z "$code" || "$code" == 1 ) ]]; then
        local crashes="$SSLFW_STATE_DIR/crashes-$id" n
        n=$(cat "$crashes" 2>/dev/null || echo 0)
        if (( n < ${SSLFW_CRASH_REQUEUES:-1} )); then
            echo $((n + 1)) > "$crashes"
            echo "[sslfw-slurm] a process died (srun rc=$rc, sslfw exit code ${code:-none}); requeueing job $id" \
                 "($((n + 1)) of SSLFW_CRASH_REQUEUES=${SSLFW_CRASH_REQUEUES:-1}): it resumes from the newest checkpoint"
            scontrol requeue "$id"
            exit 0
        fi
        echo "[sslfw-slurm] a process died again; SSLFW_CRASH_REQUEUES=${SSLFW_CRASH_REQUEUES:-1} reached, not requeueing" >&2
    fi
    exit "${code:-${rc:-1}}"
}
