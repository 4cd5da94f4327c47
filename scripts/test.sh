#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, the real-nnU-Net end-to-end tests included.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/setup_env.sh"
cd "$here"
# 2-core machines: one worker for nnU-Net's preprocessing/export
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-1}"
exec python -m pytest -p no:cacheprovider "$@"
