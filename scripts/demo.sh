#!/usr/bin/env bash
# Set up (idempotent) and run the demo: generate data, pretrain, transfer, compare strategies.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/setup_env.sh"
exec nnunet_transfer demo "$@"
