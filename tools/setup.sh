#!/usr/bin/env bash
# Create (or reuse) the project's Python environment and link it as ./.venv.
#
# The environment lives outside the clone, keyed on the hash of the requirement files, so a fresh clone (CI,
# a second checkout) reuses an existing install instead of downloading torch again:
#   ${CAFF_VENV_ROOT:-$HOME/.cache/caff-dino}/venv-<hash>
# Set CAFF_PYTHON to choose the interpreter (default: python3.11, else python3).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

python="${CAFF_PYTHON:-$(command -v python3.11 || command -v python3)}"
hash="$(cat requirements.txt requirements-test.txt requirements-extra.txt | sha256sum | cut -c1-16)"
root="${CAFF_VENV_ROOT:-$HOME/.cache/caff-dino}"
venv="$root/venv-$hash"

if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    echo "setup: creating $venv (first time: installs torch, a few minutes)"
    rm -rf "$venv"
    mkdir -p "$root"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -r requirements.txt -r requirements-test.txt -r requirements-extra.txt
    touch "$venv/.complete"
else
    echo "setup: reusing $venv"
fi
ln -sfn "$venv" .venv
