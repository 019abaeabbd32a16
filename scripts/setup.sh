#!/usr/bin/env bash
# Set up a development environment in .venv (idempotent): the package with every extra,
# and Fashion-MNIST from Debian's dataset-fashion-mnist when this machine can install it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
            || echo "note: could not install dataset-fashion-mnist; examples use scikit-learn digits"
    else
        echo "note: Fashion-MNIST not found; examples use scikit-learn digits"
    fi
fi
echo "setup done: $(.venv/bin/python -c 'import torch, triqdef; print("torch", torch.__version__, "triqdef", triqdef.__version__)')"
