#!/usr/bin/env bash
# Issue 5's GPU benchmarks in one unattended run, under 5 minutes on one NVIDIA GPU:
#   - throughput through Trainer with the data on the GPU (benchmarks/throughput.py):
#     the host's kernel launch time; the seed CNN at batch 512 written by hand (the baseline), then through
#     the trainer eager, compiled, and compiled with CUDA graphs; then with cudnn.benchmark, bf16, and at batch 2048;
#     ResNet-18 at batch 256, fp32 vs bf16 + channels-last
#     (with PyTorch's default cudnn.benchmark off, then on);
#   - the overhead benchmark (hand-written loop vs Trainer), where benchmarks/overhead.py takes --device.
#
#   bash benchmarks/gpu.sh        # any folder; everything printed also goes to ${OUT:-.}/gpu-results.txt
#
# Needs Python with PyTorch, torchvision, pluggy, click and tomli-w; no network and no install:
# the sources run from this checkout through PYTHONPATH.  Wheels in .whl/ (pure-Python packages the
# machine lacks, e.g. tomli-w: `pip download --no-deps -d .whl tomli-w`) are installed into a
# temporary folder first.  Each step has a time limit; a failed step is reported and the next runs.
# Settings: PYTHON (default python3); BENCH_DEVICE (default cuda); BENCH_QUICK=1 runs tiny sizes,
# e.g. `BENCH_DEVICE=cpu BENCH_QUICK=1 bash benchmarks/gpu.sh` checks the script without a GPU.
set -euo pipefail
mkdir -p "${OUT:-.}"
RESULTS="$(cd "${OUT:-.}" && pwd)/gpu-results.txt"
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEVICE=${BENCH_DEVICE:-cuda}
QUICK=${BENCH_QUICK:+--quick}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SITE=$(mktemp -d)  # carried wheels and the package's metadata, for this run only
trap 'rm -rf "$SITE"' EXIT
failed=()

# step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS; report how it ended.
step() {
    local name=$1 limit=$2 started=$SECONDS rc=0 why
    shift 2
    echo
    echo "=== $name (limit $limit s): $*"
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "=== $name: done in $((SECONDS - started)) s"
    else
        if [ "$rc" -eq 124 ]; then why="timed out after $limit s"; else why="exit status $rc"; fi
        echo "=== $name: FAILED ($why)"
        failed+=("$name")
    fi
}

# Entry points (the overhead benchmark loads the built-in plugins by name) need the package's
# metadata: without an installed trainer-core, build it offline into $SITE (sources stay the checkout's).
ensure_entry_points() {
    if "$PYTHON" -c 'import sys; from importlib.metadata import entry_points
sys.exit(not any(e.name == "tensorboard" for e in entry_points(group="trainer.plugins")))'; then
        return 0
    fi
    echo "trainer-core is not installed: installing its metadata (entry points) into $SITE/package, offline"
    local log  # setuptools' warnings only when the build fails
    if ! log=$("$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE/package" . 2>&1); then
        echo "$log"
        return 1
    fi
    export PYTHONPATH="$PYTHONPATH:$SITE/package"
}

main() {
    echo "trainer-core GPU benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
    else
        echo "nvidia-smi: not found"
    fi
    "$PYTHON" -c 'import os, sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, CUDA available: {torch.cuda.is_available()}, {os.cpu_count()} CPUs")'
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE/wheels" .whl/*.whl
        export PYTHONPATH="$PYTHONPATH:$SITE/wheels"
    fi
    # Checked once before any step: a missing package is named here, not three times below.
    if ! "$PYTHON" -c 'import torchvision, trainer_core.trainer, trainer_core_plugins.models.convnet'; then
        echo "cannot import what the benchmarks need (above): put wheels of the missing packages in .whl/ (see this script's header)"
        return 3
    fi

    step "throughput: seed CNN, by hand, eager, compiled, CUDA graphs" 150 \
        "$PYTHON" benchmarks/throughput.py --device "$DEVICE" --only cnn $QUICK
    step "throughput: seed CNN with cudnn.benchmark, bf16, CUDA graphs, batch 2048" 120 \
        "$PYTHON" benchmarks/throughput.py --device "$DEVICE" --only cnn-more $QUICK
    step "throughput: ResNet-18, fp32 vs bf16 + channels-last, cudnn.benchmark off then on" 90 \
        "$PYTHON" benchmarks/throughput.py --device "$DEVICE" --only resnet --cudnn-benchmark-too $QUICK

    local help sizes
    help=$("$PYTHON" benchmarks/overhead.py --help 2>&1 || true)
    if grep -q -- "--device" <<<"$help"; then
        if [ -n "$QUICK" ]; then sizes=(--repeats 1 --steps 4 --batch-sizes 4); else sizes=(--repeats 3); fi
        if ensure_entry_points; then
            step "overhead: hand-written loop vs Trainer" 90 \
                "$PYTHON" benchmarks/overhead.py --device "$DEVICE" "${sizes[@]}"
        else
            echo "=== overhead: FAILED (could not install trainer-core's entry points)"
            failed+=("overhead")
        fi
    else
        echo
        echo "=== overhead: skipped (benchmarks/overhead.py takes no --device option)"
    fi

    echo
    if [ "${#failed[@]}" -gt 0 ]; then
        echo "FAILED steps: ${failed[*]}"
        return 1
    fi
    echo "all steps done; this output is in $RESULTS"
}

main "$@" 2>&1 | tee "$RESULTS"
