#!/usr/bin/env bash
# A GPU session in four device calls of <= 10 minutes each (the device tool's per-call limit),
# logs tarred into $OUT/logs.tgz. Peers' wheels (liger-kernel, bitsandbytes, gguf) travel in .whl/
# (carry it); `git rev-parse HEAD > .sha` before the call names the commit in the JSONL rows.
#
#   bash bench/gpu_session.sh tests       # pytest -m gpu, one process per test file (a CUDA
#                                         # fault poisons its process), each under a time limit
#   bash bench/gpu_session.sh tests_attn  # the attention and fused-CE GPU tests (slow: autotune)
#   bash bench/gpu_session.sh kernels   # every kernel bench --quick; the fused CE and attention
#                                       # also print a per-kernel profile of their fwd+bwd
#   bash bench/gpu_session.sh train     # bench/train.py: every workload x system, table last
set -u
cd "$(dirname "$0")/.."
part=${1:?usage: bash bench/gpu_session.sh tests|tests_attn|kernels|train}
case "$part" in tests|tests_attn|kernels|train) ;;
  *) echo "unknown part $part (tests|tests_attn|kernels|train)" >&2; exit 2 ;; esac
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1 EMBER_GIT_SHA=$(cat .sha 2>/dev/null)
logs=${OUT:-bench/results}/logs
mkdir -p "$logs/md"
export EMBER_BENCH_MD_DIR="$logs/md"

run() {  # run NAME SECONDS CMD...: one step under a time limit, its log in $logs/NAME.log
  local name=$1 limit=$2
  shift 2
  local s=$SECONDS
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc $((SECONDS - s))s"
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$logs/$name.log" | tail -8
}

gpu_tests=$(grep -l "mark.gpu" tests -r --include="test_*.py" | sort)
case "$part" in
  tests)  # everything but attention and the fused CE: ~8 files, each <= 60 s
    for f in $gpu_tests; do
      case "$f" in *attention*|*cross_entropy*) continue ;; esac
      run "pytest_$(basename "$f" .py)" 60 python3 -m pytest -m gpu -q -rf -p no:cacheprovider "$f"
    done
    ;;
  tests_attn)  # the two slow ones (every shape autotunes its kernels once)
    run pytest_test_attention 330 python3 -m pytest -m gpu -q -rf -p no:cacheprovider \
      tests/kernels/test_attention.py
    run pytest_test_cross_entropy 200 python3 -m pytest -m gpu -q -rf -p no:cacheprovider \
      tests/kernels/test_cross_entropy.py
    ;;
  kernels)
    for b in rms_norm rope swiglu nf4 lora adamw8bit; do
      run "bench_$b" 60 python3 "bench/$b.py" --quick
    done
    run bench_linear_cross_entropy 120 python3 bench/linear_cross_entropy.py --quick \
      --profile triton
    run bench_attention 150 python3 bench/attention.py --quick --profile triton
    ;;
  train)
    run bench_train 540 python3 bench/train.py --time-budget 500
    ;;
esac

cp bench/results/*.jsonl "${OUT:-/tmp}/" 2>/dev/null
for md in "$logs"/md/*.md; do [ -e "$md" ] && { cat "$md"; echo; }; done
if [ -n "${OUT:-}" ]; then (cd "$OUT" && tar czf logs.tgz logs && rm -rf logs); fi
