#!/usr/bin/env bash
# The GPU checks of issue 18 in one run of at most 8 minutes on an H200, most important first: the CUDA
# tests, batch-1 decode with CUDA graphs (eager and compiled forwards) and without, served vs offline,
# TTFT at 64 concurrent streams; then, while time is left, the kernels of a decode step, TTFT with
# --compile, offline throughput (plain, compiled, async scheduling), the async-scheduling figures and the
# host-step bench.
# Each step is bounded by `timeout` and by what is left of $BUDGET seconds (default 470), so one that
# hangs costs only its bound, and a step that would start with under 15 s left is skipped (said so in
# its log); logs go to $OUT (default ./gpu-out).
#
# Run from the repository root on the GPU host, with kvserve and its dependencies installed, or
# with their wheels in .whl/ (made where pip works by docs/gpu-wheels.sh: kvserve and the serving
# dependencies the host's image lacks): they are installed to /tmp/site first.
set -uo pipefail
OUT=${OUT:-gpu-out}
BUDGET=${BUDGET:-470}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
SHAPE=${SHAPE:-qwen2.5-0.5b}
BENCH=${BENCH:-/tmp/gpu-bench}   # the benches' JSON and plots (the logs in $OUT hold their tables)
step() {   # step SECONDS LOGNAME COMMAND...: run, bounded (by SECONDS and by the budget left), say how it ended
    local limit=$1 log=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if ((left < 15)); then
        echo "== skipped, ${left}s of the ${BUDGET}s budget left: $*" | tee -a "$OUT/$log"
        return
    fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS
    echo "== $* (limit ${limit}s)" | tee -a "$OUT/$log"
    timeout -k 15 "$limit" "$@" >>"$OUT/$log" 2>&1   # SIGTERM first: a bench stops the servers it launched
    echo "== exit $? after $((SECONDS - t0))s" | tee -a "$OUT/$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; lscpu | grep 'Model name'; git log -1 --oneline
  python3 -c 'import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)'
} >"$OUT/env.txt" 2>&1

# kernels (empty Triton cache: every compile counted), the engine against transformers on CUDA, and
# the decode graphs capturing the torch.compile'd forward (new, never run on a GPU before)
step 170 tests.log python3 -m pytest -q -p no:randomly -x tests/test_triton_kernels.py tests/test_triton_variants.py \
    tests/test_decode_graphs.py tests/test_async_scheduling.py "tests/test_engine_equivalence.py::test_async_scheduling" \
    "tests/test_engine_equivalence.py::test_batched" "tests/test_engine_equivalence.py::test_preemption_recompute" \
    "tests/test_compile.py::test_the_decode_graphs_run_the_compiled_forward"

# batch-1 decode against the memory floor: CUDA graphs of the eager forward, of the compiled one (fewer,
# fused kernels: is the graphed step bound by its ~940 small kernels?), then no graphs
step 45 decode_floor.log python3 -m kvserve.bench decode-floor --device cuda --model-shape "$SHAPE" --no-generate \
    --out-dir "$BENCH/df-graphs"
step 100 decode_floor.log python3 -m kvserve.bench decode-floor --device cuda --model-shape "$SHAPE" --no-generate \
    --compile --out-dir "$BENCH/df-compiled"
step 30 decode_floor.log python3 -m kvserve.bench decode-floor --device cuda --model-shape "$SHAPE" --no-generate \
    --enforce-eager --out-dir "$BENCH/df-eager"

# served vs offline (medians of three runs: a first run is often the slowest), TTFT and probes under
# 128 streams; start-up and the full warm-up take most of it, a timed run is ~2 s
step 85 served.log python3 -m kvserve.bench served --device cuda --model-shape "$SHAPE" --probe-seconds 5 \
    --repeats 3 --out-dir "$BENCH/served-sync"

# TTFT with 64 concurrent streams of 128 tokens (the TTFT goal), kvserve's default step budget
step 60 serve64.log python3 -m kvserve.bench serve --device cuda --model-shape "$SHAPE" --launch kvserve \
    --concurrency 64 --num-requests 256 --output-len 128:128 --out-dir "$BENCH/serve64"
# the kernels a decode step launches on the GPU, eager and compiled (939 and 345, counted on CPU as a proxy)
step 60 kernels.log python3 -m kvserve.bench kernels --device cuda --model-shape "$SHAPE" --out-dir "$BENCH/kernels"
# TTFT at 64 streams with --compile (prefill and mixed steps run no graph: compiled, they lose most of their Python)
step 90 serve64.log python3 -m kvserve.bench serve --device cuda --model-shape "$SHAPE" --launch kvserve \
    --concurrency 64 --num-requests 256 --output-len 128:128 --kvserve-args=--compile --out-dir "$BENCH/serve64-compiled"

# offline throughput: plain, compiled and async scheduling in one run
step 100 throughput.log python3 -m kvserve.bench throughput --device cuda --model-shape "$SHAPE" --num-requests 64 \
    --systems kvserve,kvserve_compiled,kvserve_async --out-dir "$BENCH/tp"

# while time is left: async scheduling's batch-1 time per token and its served run, the host's share of a step
step 35 decode_floor.log python3 -m kvserve.bench decode-floor --device cuda --model-shape "$SHAPE" --no-generate \
    --async-scheduling --out-dir "$BENCH/df-async"
step 85 served.log python3 -m kvserve.bench served --device cuda --model-shape "$SHAPE" --probe-seconds 5 \
    --repeats 3 --async-scheduling --out-dir "$BENCH/served-async"
step 20 host_step.log python3 -m kvserve.bench host-step --out-dir "$BENCH/host-step"
grep -h "skipped\|decode at batch 1\|capture\|passed\|failed\|time per token\|kvserve decode step\|output tok/s\|served / offline\|median of\|probe p99\|TTFT\|kvserve_async\|kvserve_compiled\|^eager \|^compiled \|^kvserve \|^16,384" \
    "$OUT"/*.log >"$OUT/summary.txt" 2>/dev/null
cat "$OUT/summary.txt"
