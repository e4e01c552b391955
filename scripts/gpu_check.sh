#!/usr/bin/env bash
# scripts/gpu_check.sh: one command that builds idl against the torch already
# installed and checks it on the local NVIDIA GPU, then prints one summary table.
#
#   bash scripts/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
#
# With a CUDA torch and a GPU (about 5 to 8 minutes on an H100/H200, the build
# included):
#   1. build: IDL_CUDA=1, TORCH_CUDA_ARCH_LIST = the local GPU's architecture
#      only (a short build), `setup.py build_ext --inplace`;
#   2. the GPU tests: tests/test_cuda.py and every device-parametrised test
#      (tests/devices.py's DEVICES) on cuda, i.e. `-m "cuda and not slow"`;
#   3. benchmarks/bench_cuda.py: the training step against torchidl 0.0.4
#      (784->100->10 and 784->4096->10, batch 128; the row says so when torchidl
#      is not installed: nothing is downloaded), and the forward solve at hidden
#      4096, batch 4096 against its GEMM bound (iterations x one X·Aᵀ), with
#      the host's waits and checks per solve, for several IDL_CUDA_CHECK_EVERY;
#   4. a short SIM fit on the GPU (digits, a small ReLU MLP teacher).
# Without a CUDA device it runs what it can: the CPU build and the CPU half of
# the same tests, and says where the GPU part starts.
#
# Nothing is installed or downloaded. Logs go to $GPU_CHECK_LOGS (default
# build/gpu_check). Exit status: 0 when every step that ran passed.
set -u -o pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
fi
LOGS=${GPU_CHECK_LOGS:-build/gpu_check}
mkdir -p "$LOGS"
SUMMARY="$LOGS/summary.tsv"
: > "$SUMMARY"
STARTED=$(date +%s)
FAILED=0

# Each step has a time limit, so that a hang shows as a failed row rather than
# a check that never ends (coreutils' timeout; none where it is missing).
limit() {  # seconds, command...
    local seconds=$1
    shift
    if command -v timeout > /dev/null; then timeout "$seconds" "$@"; else "$@"; fi
}

row() {  # step, result, detail
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$SUMMARY"
}
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }
# pytest's last line ("12 passed, 3 skipped in 4.5s"), or what went wrong
pytest_line() { tail -n 1 "$1" | sed 's/=//g; s/^ *//; s/ *$//'; }

print_summary() {
    echo
    echo "==================== idl GPU check: summary ===================="
    { printf 'STEP\tRESULT\tDETAIL\n'; cat "$SUMMARY"; } | column -t -s $'\t' 2>/dev/null \
        || { printf 'STEP\tRESULT\tDETAIL\n'; cat "$SUMMARY"; }
    echo "total $(elapsed "$STARTED"); logs in $LOGS"
}

if ! $PY -c "import torch" 2>/dev/null; then
    row "python" "FAILED" "$PY cannot import torch (set PYTHON=...)"
    print_summary
    exit 1
fi
read -r TORCH_VERSION TORCH_CUDA HAS_GPU GPU_ARCH GPU_NAME < <($PY - <<'EOF'
import torch
gpu = torch.version.cuda is not None and torch.cuda.is_available()
arch = "%d.%d" % torch.cuda.get_device_capability() if gpu else "-"
name = torch.cuda.get_device_name().replace(" ", "_") if gpu else "-"
print(torch.__version__, torch.version.cuda or "none", int(gpu), arch, name)
EOF
)
row "environment" "torch $TORCH_VERSION" "CUDA $TORCH_CUDA, python $($PY -c 'import platform; print(platform.python_version())'), GPU ${GPU_NAME//_/ } (sm $GPU_ARCH)"

# ---- 1. build ---------------------------------------------------------------------
if [ "$HAS_GPU" = 1 ]; then
    export IDL_CUDA=1 TORCH_CUDA_ARCH_LIST="$GPU_ARCH"
    WHAT="CUDA build for sm $GPU_ARCH"
else
    export IDL_CUDA=0
    WHAT="CPU build"
fi
echo "== build ($WHAT): $PY setup.py build_ext --inplace (log: $LOGS/build.log)"
T=$(date +%s)
if $PY setup.py build_ext --inplace --build-temp "$LOGS/build-temp" > "$LOGS/build.log" 2>&1; then
    row "build" "ok" "$WHAT, $(elapsed "$T")"
else
    tail -n 30 "$LOGS/build.log"
    row "build" "FAILED" "$WHAT: see $LOGS/build.log"
    print_summary
    exit 1
fi

# ---- 2. tests -----------------------------------------------------------------------
TESTS=(tests/test_cuda.py tests/test_fixed_point.py tests/test_projection.py tests/test_sim_prox.py)
if [ "$HAS_GPU" = 1 ]; then
    MARKS="cuda and not slow"
    WHO="GPU tests"
else
    MARKS="not cuda and not slow"
    WHO="CPU half of the tests"
fi
echo "== $WHO: pytest -m \"$MARKS\" ${TESTS[*]}"
T=$(date +%s)
if limit 420 $PY -m pytest -q -p no:cacheprovider -m "$MARKS" "${TESTS[@]}" > "$LOGS/tests.log" 2>&1; then
    row "$WHO" "ok" "$(pytest_line "$LOGS/tests.log"), $(elapsed "$T")"
else
    grep -E "^(FAILED|ERROR)" "$LOGS/tests.log" | head -n 20
    row "$WHO" "FAILED" "$(pytest_line "$LOGS/tests.log"): see $LOGS/tests.log"
    FAILED=1
fi

if [ "$HAS_GPU" != 1 ]; then
    echo
    echo "no CUDA device: GPU part skipped (GPU tests, benchmarks, SIM on the GPU)"
    row "GPU part" "skipped" "no CUDA device (torch CUDA: $TORCH_CUDA)"
    print_summary
    exit $FAILED
fi

# ---- 3. benchmarks ---------------------------------------------------------------------
BENCH=(benchmarks/bench_cuda.py --summary "$SUMMARY" --warmup 2 --reps 5)
echo "== benchmarks (log: $LOGS/bench.log)"
T=$(date +%s)
STATUS=0
{
    limit 90 "$PY" "${BENCH[@]}" --only training --batch 128 --input 784 --hidden 100 --output 10 || STATUS=1
    limit 120 "$PY" "${BENCH[@]}" --only training --batch 128 --input 784 --hidden 4096 --output 10 || STATUS=1
    limit 150 "$PY" "${BENCH[@]}" --only bound --bound-hidden 4096 --bound-batch 4096 --check-every 1 8 16 0 || STATUS=1
} > "$LOGS/bench.log" 2>&1
cat "$LOGS/bench.log"
if [ $STATUS = 0 ]; then
    row "benchmarks" "ok" "$(elapsed "$T")"
else
    row "benchmarks" "FAILED" "see $LOGS/bench.log"
    FAILED=1
fi

# ---- 4. SIM on the GPU -------------------------------------------------------------------
echo "== SIM fit on the GPU (log: $LOGS/sim.log)"
T=$(date +%s)
if ! $PY -c "import sklearn" 2>/dev/null; then
    row "SIM fit on the GPU" "skipped" "scikit-learn (the digits) is not installed"
elif limit 120 $PY - > "$LOGS/sim.log" 2>&1 <<'EOF'
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_digits

from idl.sim import SIM, balance_hidden_norms

torch.manual_seed(0)
images, labels = load_digits(return_X_y=True)
U = torch.tensor(images / 16.0, dtype=torch.float32)
y = torch.tensor(labels)
train = DataLoader(TensorDataset(U[:1400], y[:1400]), batch_size=64, shuffle=True)
test = DataLoader(TensorDataset(U[1400:], y[1400:]), batch_size=512)
teacher = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 32, bias=False),
                        nn.ReLU(), nn.Linear(32, 10, bias=False))
optimizer = torch.optim.Adam(teacher.parameters(), lr=5e-3)
for _ in range(15):
    for u, label in train:
        optimizer.zero_grad()
        nn.functional.cross_entropy(teacher(u), label).backward()
        optimizer.step()
balance_hidden_norms(teacher, 0.9)
with torch.no_grad():
    teacher_accuracy = (teacher(U[1400:]).argmax(1) == y[1400:]).float().mean().item()
start = time.perf_counter()
sim = SIM(activation_fn=nn.functional.relu, kappa=0.99, device="cuda")
sim.train(model=teacher, dataloader=train)
torch.cuda.synchronize()
seconds = time.perf_counter() - start
accuracy = sim.evaluate(test)
assert sim.implicit_model.A.device.type == "cuda"
print(f"SIM_RESULT\tteacher {100 * teacher_accuracy:.1f}%, SIM {100 * accuracy:.1f}%, fit {seconds:.2f} s")
assert accuracy > teacher_accuracy - 0.05, (accuracy, teacher_accuracy)
EOF
then
    row "SIM fit on the GPU" "ok" "$(grep SIM_RESULT "$LOGS/sim.log" | cut -f2), $(elapsed "$T") in all"
else
    tail -n 20 "$LOGS/sim.log"
    row "SIM fit on the GPU" "FAILED" "see $LOGS/sim.log"
    FAILED=1
fi

print_summary
exit $FAILED
