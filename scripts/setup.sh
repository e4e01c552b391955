#!/usr/bin/env bash
# All of idl's set-up on a fresh machine, into ./.venv: torch (pinned; override
# with IDL_TORCH="torch==X.Y.Z" or any pip requirement), the SIM and test
# dependencies, and idl itself, compiled against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_REQUIREMENT="${IDL_TORCH:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }

pip_install "setuptools>=64" wheel
pip_install "$TORCH_REQUIREMENT"
# --no-build-isolation: compile against the torch installed above, not a fresh
# one that pip would fetch into an isolated build environment.
pip_install --no-build-isolation -e ".[test]"
