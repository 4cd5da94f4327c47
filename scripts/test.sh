#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, the real-nnU-Net end-to-end tests included.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/setup_env.sh"
cd "$here"
# 2-core machines: one worker for nnU-Net's preprocessing/export
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-1}"
# two pytest workers (pytest-xdist), one torch thread each: most of an end-to-end test is single-threaded (importing
# torch, nnU-Net's trainer search, preprocessing, data augmentation in the main process), so two of them at once
# use both cores; tests/conftest.py keeps each module, and the modules sharing a session fixture, on one worker
# (its pytest_xdist_make_scheduler; --dist loadfile is the fallback).
# NNUNET_TRANSFER_TEST_WORKERS=0 runs everything in this process.
exec python -m pytest -p no:cacheprovider -n "${NNUNET_TRANSFER_TEST_WORKERS:-2}" --dist loadfile "$@"
