#!/usr/bin/env bash
# The GPU checks of divmoe, as one script for a machine with a CUDA GPU (under 8 minutes: the
# steps' limits are 60 s install, 180 s tests, 150 + 120 s bench):
#   1. environment: torch with CUDA, triton (installed from PyPI if missing and reachable);
#   2. tests/test_cuda.py and tests/test_triton_dispatch.py on the GPU (compiled kernels);
#   3. divmoe bench --device cuda (bf16: divmoe, divmoe[triton], torch:grouped_mm, dense and
#      the HF peers): the fine-grained 2048,768,128,8 at 32k tokens with --train (training
#      tokens/s of the default model and its dense twin), then the default shapes.
# Everything goes to one folder: $OUT if set, else benchmarks/results/gpu-<UTC time>/
# (env.txt, tests.log, tests.xml, bench-{fine,default}.{json,md,log}, summary.txt).
# Each step has its own time limit and the script carries on past a failed step; the exit
# status is non-zero if any step failed. Run from anywhere: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, whatever is installed
unset TRITON_INTERPRET                                  # compiled kernels, not the interpreter
export HF_HUB_OFFLINE=1  # hub-fetched HF kernels (deepgemm, sonicmoe) fail fast, not on timeouts
status=0
step() { echo "== $(date -u +%T) $*" | tee -a "$OUT/summary.txt"; }

step "environment"
{
  nvidia-smi || echo "nvidia-smi not found"
  "$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("triton", "transformers", "pytest", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__, exc)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  step "FAIL: torch sees no CUDA device: nothing to check here"
  exit 1
fi
for pkg in pytest triton; do  # what the checks need; the rest of [dev] is optional here
  if ! "$PY" -c "import $pkg" 2>/dev/null; then
    spec=$pkg; [ "$pkg" = triton ] && spec="triton>=3.9"
    step "installing $spec (not importable)"
    if ! timeout 60 "$PY" -m pip install --quiet --disable-pip-version-check --retries 0 \
        --timeout 10 "$spec" \
        >> "$OUT/env.txt" 2>&1; then
      step "could not install $spec (offline?): checks needing it are skipped or fail below"
    fi
  fi
done

step "tests on CUDA: tests/test_cuda.py tests/test_triton_dispatch.py"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/tests.xml" \
  tests/test_cuda.py tests/test_triton_dispatch.py > "$OUT/tests.log" 2>&1
rc=$?
tail -n 25 "$OUT/tests.log"
step "tests exit status $rc"
[ "$rc" -eq 0 ] || status=1

# Two runs, so a slow one cannot lose the other's results: the fine-grained shape (the issue's
# headline comparison) with training tokens/s, then the default shapes.
bench() {  # name, time limit, bench arguments...
  local name=$1 limit=$2; shift 2
  step "divmoe bench --device cuda $* ($name)"
  timeout "$limit" "$PY" -m divmoe bench --device cuda "$@" --json "$OUT/$name.json" \
    > "$OUT/$name.md" 2> "$OUT/$name.log"
  local rc=$?
  cat "$OUT/$name.md"
  step "$name exit status $rc"
  [ "$rc" -eq 0 ] || { status=1; tail -n 30 "$OUT/$name.log"; }
}
bench bench-fine 150 --shape 2048,768,128,8 --tokens 32768 --train
bench bench-default 120 --shape 512,1024,8,2 --shape 512,256,64,8 --shape 1024,512,32,4

step "done: results in $OUT (exit status $status)"
exit "$status"
