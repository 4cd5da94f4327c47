#!/usr/bin/env bash
# Creates (once) and activates the Python environment for this checkout; sourced by test.sh and demo.sh.
#
# The environment lives outside the clone, keyed by a hash of pyproject.toml, so a fresh clone (CI) with
# unchanged dependencies reuses it and only re-installs this package (seconds). Delete the folder, or
# set NNUNET_TRANSFER_VENV, to choose another place.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
key="$(cat "$here/pyproject.toml" | sha256sum | cut -c1-12)"
venv="${NNUNET_TRANSFER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nnunet-transfer/venv-$key}"

if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    echo "setup: creating $venv (nnU-Net, torch: a few minutes the first time)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # torch 2.14.1 + torchvision 0.29.1 are a matching pair (nnU-Net's trainer search imports torchvision);
    # pip resolves them through nnunetv2. Do not pre-install another torch into this environment.
    "$venv/bin/python" -m pip install -q -e "$here[test]"
    touch "$venv/.complete"
else
    "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$here" 2>/dev/null \
        || "$venv/bin/python" -m pip install -q --no-deps -e "$here"
fi
# this environment is ours: opt in to one-line hints for a misspelt -tr in nnUNetv2_predict too
"$venv/bin/nnunet_transfer" doctor --install-hints >/dev/null
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
