# One device session: GPU tests and benches, logs tarred into $OUT (see bench/run_all.sh for the
# plain all-in-one runner).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1 EMBER_GIT_SHA=$(cat .sha 2>/dev/null)
mkdir -p $OUT/logs
timeout 80 python3 -m pytest -m gpu -q -rf --timeout 40 -p no:cacheprovider tests/kernels/test_attention.py > $OUT/logs/pytest_attn.log 2>&1
echo "pytest rc=$?"; grep -E "FAILED|passed|failed" $OUT/logs/pytest_attn.log | tail -12
s=$SECONDS; timeout 100 python3 bench/attention.py --quick > $OUT/logs/attention.log 2>&1; echo "== attention rc=$? $((SECONDS-s))s"
s=$SECONDS; timeout 150 python3 bench/train.py --quick --time-budget 110 > $OUT/logs/train.log 2>&1; echo "== train rc=$? $((SECONDS-s))s"
cp bench/results/*.jsonl $OUT/ 2>/dev/null; cp bench/results/*.md $OUT/ 2>/dev/null
cd $OUT && tar czf logs.tgz logs && rm -rf logs
