#!/usr/bin/env bash
# Record the GPU(s) SLURM gave this job into $1, after waiting (up to 60 s) until both GPU
# jobs of the trivial workflow have started, so that they certainly overlap.
set -euo pipefail
mkdir -p started
touch "started/$SLURM_JOB_ID"
for _ in $(seq 300); do
    (($(ls started | wc -l) >= 2)) && break
    sleep 0.2
done
echo "cuda=${CUDA_VISIBLE_DEVICES:-none} job=$SLURM_JOB_ID started=$(ls started | wc -l)" > "$1"
