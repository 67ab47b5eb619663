#!/usr/bin/env bash
# Set up (once) and run the test suite: a virtualenv in .venv with jaxllm and its test extras
# (CPU jax, CPU torch for parity checks), then pytest. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
exec .venv/bin/python -m pytest "$@"
