#!/usr/bin/env bash
# Record into $1 the GPU this job sees (CUDA_VISIBLE_DEVICES) and the one SLURM allocated to
# it (scontrol's IDX, only shown while the job runs), after waiting up to 60 s until both
# GPU jobs have started, so that they certainly hold their GPUs at the same time.
set -euo pipefail
mkdir -p started
touch "started/$SLURM_JOB_ID"
for _ in $(seq 300); do
    (($(ls started | wc -l) >= 2)) && break
    sleep 0.2
done
idx=$(scontrol show job --details "$SLURM_JOB_ID" \
    | sed -n 's/.*GRES=gpu[^(]*(IDX:\([0-9,-]*\)).*/\1/p')
echo "cuda=${CUDA_VISIBLE_DEVICES:-none} slurm_idx=${idx:-none} job=$SLURM_JOB_ID" \
    "started=$(ls started | wc -l)" > "$1"
