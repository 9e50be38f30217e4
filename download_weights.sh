#!/usr/bin/env bash
# Download SDXL base 1.0 (only the files SDXL needs) into ./weights/sdxl-base-1.0.
#
#   ./download_weights.sh                 # fp32 weights (~14 GB)
#   ./download_weights.sh --fp16          # the fp16 variant (~7 GB)
#   ./download_weights.sh --revision <commit> --dir weights/other --repo owner/name
#   ./download_weights.sh --from-single-file model.safetensors --dir weights/my-model
#
# Resumable (rerun it after an interruption), retried on network errors, and checked: every
# file's size is compared with the Hub's, and weights/<name>/manifest.json lists each file
# with its size and sha256. Gated repositories need a token in the HF_TOKEN environment
# variable. The Snakemake workflow's weights rule calls the same code (sdxl/prepare.py).
set -euo pipefail
cd "$(dirname "$0")"
exec uv run python -m sdxl.prepare "$@"
