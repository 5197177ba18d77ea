#!/usr/bin/env bash
# The GPU checks of issue 18 in one run on an H200: the CUDA tests, then the figures with async
# scheduling off and on, then TTFT at 64 concurrent streams. Each step is bounded by `timeout` (580 s
# in all, under the device tool's 600 s a command; most steps end well before their bound), so one
# that hangs costs its budget and the rest still run; logs go to $OUT (default ./gpu-out).
#
# Run from the repository root on the GPU host, with kvserve and its dependencies installed, or
# with their wheels in .whl/ (built where pip works: `pip wheel --no-deps . -w .whl`, plus fastapi,
# starlette, uvicorn, pydantic, pydantic-core, prometheus-client, opentelemetry-api, ... for the
# host's Python, and aiohttp with its dependencies for the load client): they are installed to
# /tmp/site first.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
SHAPE=${SHAPE:-qwen2.5-0.5b}
BENCH=${BENCH:-/tmp/gpu-bench}   # the benches' JSON and plots (the logs in $OUT hold their tables)
step() {   # step SECONDS LOGNAME COMMAND...: run, bounded, and say how it ended
    local limit=$1 log=$2
    shift 2
    local t0=$SECONDS
    echo "== $* (limit ${limit}s)" | tee -a "$OUT/$log"
    timeout "$limit" "$@" >>"$OUT/$log" 2>&1
    echo "== exit $? after $((SECONDS - t0))s" | tee -a "$OUT/$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; lscpu | grep 'Model name'; git log -1 --oneline
  python3 -c 'import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)'
} >"$OUT/env.txt" 2>&1

# kernels (empty Triton cache: every compile counted), the engine against transformers on CUDA
step 150 tests.log python3 -m pytest -q -p no:randomly -x tests/test_triton_kernels.py tests/test_triton_variants.py \
    tests/test_decode_graphs.py tests/test_async_scheduling.py "tests/test_engine_equivalence.py::test_async_scheduling" \
    "tests/test_engine_equivalence.py::test_batched" "tests/test_engine_equivalence.py::test_preemption_recompute"

# batch-1 decode: CUDA graphs, then with async scheduling (time per token), then eager
step 50 decode_floor.log python3 -m kvserve.bench decode-floor --device cuda --model-shape "$SHAPE" --no-generate \
    --out-dir "$BENCH/df-sync"
step 40 decode_floor.log python3 -m kvserve.bench decode-floor --device cuda --model-shape "$SHAPE" --no-generate \
    --async-scheduling --out-dir "$BENCH/df-async"

# offline throughput, both modes in one run
step 90 throughput.log python3 -m kvserve.bench throughput --device cuda --model-shape "$SHAPE" --num-requests 64 \
    --systems kvserve,kvserve_async --out-dir "$BENCH/tp"

# served vs offline (medians of three runs each: a first run is often the slowest), TTFT and probes
# under 128 streams, both modes; start-up and the full warm-up dominate, a timed run is ~2 s
step 85 served.log python3 -m kvserve.bench served --device cuda --model-shape "$SHAPE" --probe-seconds 5 \
    --repeats 3 --out-dir "$BENCH/served-sync"
step 85 served.log python3 -m kvserve.bench served --device cuda --model-shape "$SHAPE" --probe-seconds 5 \
    --repeats 3 --async-scheduling --out-dir "$BENCH/served-async"
# TTFT with 64 concurrent streams of 128 tokens (the TTFT goal), kvserve's default step budget
step 60 serve64.log python3 -m kvserve.bench serve --device cuda --model-shape "$SHAPE" --launch kvserve \
    --concurrency 64 --num-requests 256 --output-len 128:128 --out-dir "$BENCH/serve64"
# the host's own share: scheduling and block-table packing per decode step of 256, by context length (CPU only)
step 20 host_step.log python3 -m kvserve.bench host-step --out-dir "$BENCH/host-step"
grep -h "passed\|failed\|time per token\|kvserve decode step\|output tok/s\|served / offline\|median of\|probe p99\|TTFT\|kvserve_async\|^kvserve \|^16,384" \
    "$OUT"/*.log >"$OUT/summary.txt" 2>/dev/null
cat "$OUT/summary.txt"
