#!/bin/bash
# One node's launcher, run by `srun` from launch/slurm/train.sbatch (one task per node):
#   node.sh CONFIG.yaml [key.path=value ...]
# Reads what train.sbatch exported (BACKEND, MASTER_ADDR, RDZV_PORT, OUTPUT_DIR, PYTHON, FSAM_REPO,
# NPROC_PER_NODE, DS_CONFIG, DS_LAUNCHER, ACCELERATE_CONFIG) and SLURM's per-task variables.
# Every backend is one `case` branch; the training command after the launcher is the same for all.
set -euo pipefail

CONFIG="$1"
shift
cd "$FSAM_REPO"
TRAIN="$FSAM_REPO/launch/train.py"
NNODES="$SLURM_JOB_NUM_NODES"
NODE_RANK="$SLURM_NODEID"

# This node's own address (the same lookup as the master's): torchrun advertises it to the others.
LOCAL_ADDR="$(scontrol show node "$SLURMD_NODENAME" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)"
LOCAL_ADDR="${LOCAL_ADDR:-$(hostname)}"

# GPUs on this node: what SLURM allocated, else what the driver shows; none -> CPU with gloo.
GPUS=0
if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    GPUS="$SLURM_GPUS_ON_NODE"
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != "NoDevFiles" ]; then
    GPUS="$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)"
elif command -v nvidia-smi > /dev/null 2>&1; then
    GPUS="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)"
fi
if [ "$GPUS" -gt 0 ]; then
    DIST_BACKEND=nccl
    NPROC="${NPROC_PER_NODE:-$GPUS}"
else
    DIST_BACKEND=gloo
    NPROC="${NPROC_PER_NODE:-1}"
fi
# Threads per process: the node's CPUs shared among its processes (torchrun would otherwise set 1).
CPUS="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CPUS / NPROC > 0 ? CPUS / NPROC : 1 ))}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
WORLD=$(( NNODES * NPROC ))

# Defaults first, the user's key=value arguments after them: the last value of a key wins, so the
# user's train.output_dir / train.resume / backend.dist_backend override these.
ARGS=(--config "$CONFIG" "train.output_dir=$OUTPUT_DIR" train.resume=auto "backend.dist_backend=$DIST_BACKEND"
      "$@")
# SLURM's time-limit warning (#SBATCH --signal=USR1@N) goes to every process of the step: the
# launchers (torchrun, deepspeed, accelerate) ignore it -- an ignored signal stays ignored across
# exec and fork -- and the training processes catch it (fsam_dist/train/signals.py): every rank
# finishes the step, a checkpoint is written, and they exit 0 leaving $OUTPUT_DIR/STOPPED.
trap '' USR1
TORCHRUN=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC"
          --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$RDZV_PORT" --rdzv_id "$SLURM_JOB_ID"
          --local_addr "$LOCAL_ADDR" --max_restarts 0)

echo "[node $NODE_RANK/$NNODES $SLURMD_NODENAME $LOCAL_ADDR] $NPROC process(es), $DIST_BACKEND," \
     "OMP_NUM_THREADS=$OMP_NUM_THREADS, backend $BACKEND"

case "$BACKEND" in
    ddp)
        exec "${TORCHRUN[@]}" "$TRAIN" "${ARGS[@]}" backend.name=ddp
        ;;
    deepspeed)
        DS_ARGS=(backend.name=deepspeed "backend.deepspeed_config=${DS_CONFIG:-configs/deepspeed/zero2.json}")
        if [ "${DS_LAUNCHER:-torchrun}" = deepspeed ]; then
            # The deepspeed launcher without ssh: every node runs it with its --node_rank and the
            # same hostfile (one line per node, "host slots=N"), written per job.
            HOSTFILE="$OUTPUT_DIR/hostfile"
            HOSTS="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
            if [ "$GPUS" -gt 0 ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
                # The runner's --num_gpus N means devices 0..N-1, not the ones SLURM gave this job:
                # name them with --include host:ids (every node is assumed to get as many GPUs;
                # the other hosts' entries only count slots). Slots must cover the largest id.
                IDS="$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | head -n "$NPROC" | paste -sd, -)"
                SLOTS=$(( $(echo "$IDS" | tr ',' '\n' | sort -n | tail -n 1) + 1 ))
                echo "$HOSTS" | sed "s/\$/ slots=$SLOTS/" > "$HOSTFILE.$NODE_RANK"
                RESOURCES=(--include "$(echo "$HOSTS" | sed "s/\$/:$IDS/" | paste -sd@ -)")
            else
                echo "$HOSTS" | sed "s/\$/ slots=$NPROC/" > "$HOSTFILE.$NODE_RANK"
                RESOURCES=(--num_nodes "$NNODES" --num_gpus "$NPROC")
            fi
            exec "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE.$NODE_RANK" --no_ssh \
                --node_rank "$NODE_RANK" "${RESOURCES[@]}" \
                --master_addr "$MASTER_ADDR" --master_port "$RDZV_PORT" "$TRAIN" "${ARGS[@]}" "${DS_ARGS[@]}"
        fi
        exec "${TORCHRUN[@]}" "$TRAIN" "${ARGS[@]}" "${DS_ARGS[@]}"
        ;;
    fsdp)
        # accelerate is the launcher only; its yaml becomes FSDP_* variables that fsam_dist reads.
        exec "$PYTHON" -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-configs/accelerate/fsdp2.yaml}" \
            --num_machines "$NNODES" --num_processes "$WORLD" --machine_rank "$NODE_RANK" \
            --main_process_ip "$MASTER_ADDR" --main_process_port "$RDZV_PORT" --rdzv_backend static \
            --max_restarts 0 "$TRAIN" "${ARGS[@]}" backend.name=fsdp
        ;;
    *)
        echo "node.sh: BACKEND=$BACKEND: expected ddp, deepspeed or fsdp" >&2
        exit 2
        ;;
esac
