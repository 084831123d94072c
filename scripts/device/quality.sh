#!/bin/bash
# On a lent GPU machine: ML-1M bench/quality.py runs, one process per protocol:model, in parallel
# on one GPU (each run is small: ten of them kept an H200 at 80-98% busy). Needs .dev/ from
# scripts/device/prepare.sh, carried. Writes $OUT/quality-gpu.json (+ .html) and $OUT/logs.tgz;
# merge with `bench/quality.py --merge-from quality-gpu.json`.
# usage: bash scripts/device/quality.sh MAX_MINUTES KILL_AFTER_S protocol:model ...
#   e.g. bash scripts/device/quality.sh 6 520 loo:redrec loo:sasrec multi-scenario:redrec
set -u
OUT=${OUT:-/tmp/out}
SITE=/tmp/site
T0=$(date +%s)
if [ ! -d $SITE/deepspeed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .dev/whl/*.whl || exit 1
  tar xzf .dev/deepspeed.tgz -C $SITE && tar xJf .dev/ml1m.txz -C $SITE || exit 1
fi
export PYTHONPATH=$SITE:. REDREC_CACHE=.dev/cache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -c "import torch, deepspeed, pydantic, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" 2>&1 | grep -v Warn || exit 1
mkdir -p /tmp/parts /tmp/logs
MAXMIN=$1; KILL=$2; shift 2
pids=()
for job in "$@"; do
  p=${job%%:*}; m=${job#*:}
  timeout -s INT "$KILL" python3 bench/quality.py --dataset movielens-1m --protocol "$p" --models "$m" \
    --max-minutes "$MAXMIN" --output "/tmp/parts/$p-$m.json" > "/tmp/logs/$p-$m.log" 2>&1 &
  pids+=($!)
done
(while sleep 20; do echo "$(( $(date +%s) - T0 ))s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader) load $(cut -d' ' -f1 /proc/loadavg)"; done) > /tmp/logs/gpu.log 2>&1 &
mon=$!
for p in "${pids[@]}"; do wait "$p"; done
kill $mon
echo "all jobs ended after $(( $(date +%s) - T0 ))s"
parts=(/tmp/parts/*.json)
args=(); for f in "${parts[@]}"; do [ -f "$f" ] && args+=(--merge-from "$f"); done
[ ${#args[@]} -gt 0 ] && python3 bench/quality.py --output "$OUT/quality-gpu.json" "${args[@]}" 2>&1 | tail -2
tar czf "$OUT/logs.tgz" -C /tmp logs parts
for f in /tmp/logs/*.log; do echo "== $f"; grep -E "^\[|stopped|steps in|Error|error" "$f" | grep -v WARNING | tail -4; done
cat /tmp/logs/gpu.log | tail -5
