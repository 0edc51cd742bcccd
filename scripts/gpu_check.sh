#!/usr/bin/env bash
# One GPU lease, prepared here and run there (issue 13): the gpu test tier, then the CIFAR-10
# reproduction for whatever time is left. Logs go to $OUT (the device tool brings them back).
#
#   bash scripts/gpu_check.sh prepare      # here: wheels for Python 3.12 into .whl/, the data into .data/ (both git-ignored)
#   bash scripts/gpu_check.sh run          # there: run(command="bash scripts/gpu_check.sh run", carry=[".whl", ".data"])
#   RD_GPU_TIER_ON_CPU=1 OUT=/tmp/gpu_check bash scripts/gpu_check.sh run     # the dry run on a CPU
#
# The GPU machine has torch, Lightning, timm, torchmetrics, tensorboard, opencv, scikit-image,
# matplotlib, scipy, tqdm and PyYAML; it lacks the rest of pyproject.toml and pytest. pyautoattack
# travels as its package alone: its wheel is 42 MB, 40 of them an example model nothing here uses.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 ptwt==1.0.1 PyWavelets==1.9.0
        foolbox==3.3.4 eagerpy==0.30.0 GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3 pytest==9.0.3 pluggy==1.7.0 iniconfig==2.3.1)

prepare() {
    mkdir -p .whl/site .data
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    local autoattack
    autoattack=$(python3 -c "import pyautoattack, os; print(os.path.dirname(pyautoattack.__file__))")
    rm -rf .whl/site/pyautoattack && cp -r "$autoattack" .whl/site/ && rm -rf .whl/site/pyautoattack/examples
    cp -n ../shared/data/cifar10-jpg.tar.gz .data/
    du -sh .whl .data
}

run() {
    OUT=${OUT:-results/gpu_check}
    mkdir -p "$OUT"
    if ls .whl/*.whl > /dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:$PWD/.whl/site:$PWD
    fi
    export PYTHONUNBUFFERED=1
    (nvidia-smi || true; python3 -c "import torch, torchvision, pytorch_lightning as pl; print(torch.__version__, torchvision.__version__, pl.__version__)") > "$OUT/environment.txt" 2>&1
    git rev-parse HEAD >> "$OUT/environment.txt" 2>&1 || true
    # The tier: at most 5 minutes on one H100 (tests/test_gpu.py); durations say where the time went.
    timeout 330 python3 -m pytest -m gpu -q -p no:cacheprovider --durations=30 tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tier.log"
    # The reproduction at full size does not fit a lease; its first stages show the real per-stage times.
    timeout "${REPRODUCE_SECONDS:-180}" python3 scripts/reproduce_cifar10.py --out /tmp/reproduce --tarball .data/cifar10-jpg.tar.gz \
        --data-root /tmp/cifar10 2>&1 | tee "$OUT/reproduce.log"
    cp /tmp/reproduce/stages.json "$OUT/" 2>/dev/null || true
}

"${1:?usage: gpu_check.sh prepare|run}"
