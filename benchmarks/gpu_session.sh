#!/usr/bin/env bash
# Everything a lent GPU should measure, in one device call, with results under $OUT:
# the throughput rows of benchmarks/gpu.py (eager, then compiled) and the test suite
# with the CUDA device parametrization on.
#
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=540)
#
# .whl/ (git-ignored) holds wheels the device machine lacks (kornia, kornia_rs for its
# Python); each phase has its own time limit so a slow compile cannot eat the others.
set -o pipefail
OUT=${OUT:-runs/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, kornia; print('torch', torch.__version__, 'kornia', kornia.__version__)" \
    | tee -a "$OUT/device.txt"
timeout 120 python3 benchmarks/gpu.py --json "$OUT/gpu-eager.json" 2>&1 | tee "$OUT/gpu-eager.txt"
TRIQDEF_TEST_CUDA=1 timeout 150 python3 -m pytest -q -n 4 -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest-cuda.txt" | tail -n 15
timeout 200 python3 benchmarks/gpu.py --mode compiled --json "$OUT/gpu-compiled.json" 2>&1 \
    | grep -v '^W[0-9]' | tee "$OUT/gpu-compiled.txt"
