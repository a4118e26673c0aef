#!/usr/bin/env bash
# On a CUDA machine: check the GPU paths and measure them, in one go (about 10 minutes).
#
#   bash tools/analysis/gpu_report.sh [OUT_DIR]        (default work_dirs/gpu_report)
#
# 1. tests of the compiled Triton kernels, the depthwise convs on CUDA, torch.compile (Inductor)
#    and parity with the released weights on CUDA;
# 2. tools/analysis/tune_triton.py: tile sizes for this GPU -> OUT_DIR/tiles.json, used below
#    through OVERLOCK_TRITON_TILES (TUNE=0 skips this and keeps the package's tiles);
# 3. benchmark.py op level (every task, OverLoCK-T) and model level (OverLoCK-T detection, batch 1
#    and, training only, the recipes' 2 images per GPU; both also with plain F.conv2d depthwise
#    convs and GRN's autograd formula, --torch-dwconv: the authors' network as it runs, and ours
#    without our dw paths and fused GRN);
#    then the batch-1 training step with the backbone compiled, mode='reduce-overhead' (CUDA
#    graphs: the answer to a step bound by the host's launch work; --compile);
# 4. profile_step.py: where an OverLoCK-T detection training step spends its GPU time;
# 5. if time is left, the detection op cases again at batch 8 (a GPU is only filled by more);
# 6. where Nsight Compute (ncu) is installed, its view of one forward launch at OverLoCK-T's
#    stage-3 detection map (throughputs, occupancy, stalls: what limits the kernel).
# Each step has a time limit; BUDGET_S (default 600) bounds the whole run. JSON, tiles and logs go
# to OUT_DIR.
set -u
OUT=${1:-work_dirs/gpu_report}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-600}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# step NAME MAX_SECONDS COMMAND...: run with a limit of MAX_SECONDS or what the budget has left
step() {
    local name=$1 max=$2
    shift 2
    local left=$((BUDGET_S - SECONDS - 10))
    local limit=$((left < max ? left : max))
    if [ "$limit" -lt 20 ]; then
        echo "== $name: skipped (budget spent)"
        return 0
    fi
    echo "== $name (limit ${limit}s, at ${SECONDS}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} at ${SECONDS}s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))" 2>&1 | tee -a "$OUT/gpu.txt"

step tests 150 $PY -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
    tests/test_ops_triton.py tests/test_ops_dwconv.py tests/test_parity.py tests/test_compile.py
if [ "${TUNE:-1}" != 0 ]; then
    rm -f "$OUT/tiles.json"  # a failed tuning run must not leave an earlier run's tiles in use
    step tune 150 $PY tools/analysis/tune_triton.py --out "$OUT/tiles.json" --json "$OUT/tune.json"
    if [ -s "$OUT/tiles.json" ]; then
        export OVERLOCK_TRITON_TILES=$OUT/tiles.json
    fi
fi
# 'native' is left out: graph-capturing its thousands of small launches takes minutes
step ops 100 $PY tools/analysis/benchmark.py --ops --impls triton reference --min-time 0.1 \
    --no-reexec --json "$OUT/bench_ops.json"
step models 100 $PY tools/analysis/benchmark.py --models --model-warmup 2 --model-repeat 5 \
    --torch-dwconv --no-reexec --json "$OUT/bench_models.json"
step models_b2 100 $PY tools/analysis/benchmark.py --models --modes train --dense-batch 2 \
    --cp-stages --model-warmup 2 --model-repeat 5 --torch-dwconv --no-reexec \
    --json "$OUT/bench_models_b2.json"
step models_compiled 120 $PY tools/analysis/benchmark.py --models --modes train \
    --compile reduce-overhead --cp-stages --model-warmup 2 --model-repeat 5 --no-reexec \
    --json "$OUT/bench_models_compiled.json"
step profile 60 $PY tools/analysis/profile_step.py --variant t --task det --rows 25
step ops_b8 90 $PY tools/analysis/benchmark.py --ops --impls triton reference --tasks det \
    --dense-batch 8 --min-time 0.1 --no-reexec --json "$OUT/bench_ops_b8.json"
if command -v ncu > /dev/null; then
    step ncu_forward 60 ncu --kernel-name regex:_fwd_body --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section LaunchStats --section MemoryWorkloadAnalysis \
        $PY -c "import torch; from overlock_mm.ops import na2d_triton as nt
a = torch.rand(1, 8, 169, 50, 84, device='cuda'); v = torch.randn(1, 8, 16, 50, 84, device='cuda')
[nt.forward(a, v, 13) for _ in range(3)]; torch.cuda.synchronize()"
fi
echo "== done at ${SECONDS}s"
