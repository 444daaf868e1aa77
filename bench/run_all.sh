#!/usr/bin/env bash
# Everything GPU-side in one go, on a CUDA machine (the lead runs it on an H100):
#   1. installs ember editable if `import ember` fails (--no-deps: torch/triton stay as they are),
#   2. `pytest -m gpu -q tests` (the full dtype matrix of every kernel test),
#   3. every bench/*.py except _harness.py, each in its own process, with --quick (pass --full for
#      the complete shape lists), continuing past failures, under a per-bench time limit,
#   4. prints every bench's markdown table last.
# Budget: all of it in ~9 minutes on an H100; hence --quick and BENCH_TIMEOUT (seconds per bench,
# default 75). Logs go to $OUT/bench_logs when $OUT is set (the device runner), else to
# bench/results/logs; JSONL rows land in bench/results/ and are copied to $OUT too.
# Usage: bash bench/run_all.sh [--full] [--no-tests]
set -u
cd "$(dirname "$0")/.."

shape_flag=--quick
run_tests=1
for arg in "$@"; do
  case "$arg" in
    --full) shape_flag= ;;
    --no-tests) run_tests=0 ;;
    *) echo "unknown argument: $arg (use --full, --no-tests)" >&2; exit 2 ;;
  esac
done

logs=${OUT:+$OUT/bench_logs}
logs=${logs:-bench/results/logs}
mkdir -p "$logs/md"
export EMBER_BENCH_MD_DIR="$logs/md"
rm -f "$logs"/md/*.md

if ! python -c "import ember" 2>/dev/null; then
  pip install --no-deps --no-build-isolation -e . >"$logs/pip.log" 2>&1 || {
    echo "pip install -e . failed; see $logs/pip.log" >&2; exit 1; }
fi

status=0
if [ "$run_tests" = 1 ]; then
  echo "== pytest -m gpu"
  start=$SECONDS
  python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$logs/pytest_gpu.log" | tail -n 30
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  echo "   ($((SECONDS - start)) s)"
fi

for f in bench/*.py; do
  name=$(basename "$f" .py)
  [ "$name" = "_harness" ] && continue
  echo "== bench $name $shape_flag"
  start=$SECONDS
  timeout "${BENCH_TIMEOUT:-75}" python "$f" $shape_flag >"$logs/$name.log" 2>&1
  rc=$?
  echo "   rc=$rc ($((SECONDS - start)) s), log $logs/$name.log"
  if [ $rc != 0 ]; then
    status=1
    tail -n 5 "$logs/$name.log"
  fi
done

if [ -n "${OUT:-}" ]; then
  cp bench/results/*.jsonl "$OUT/" 2>/dev/null || true
fi

echo
echo "== results"
for md in "$logs"/md/*.md; do
  [ -e "$md" ] && { cat "$md"; echo; }
done
exit $status
