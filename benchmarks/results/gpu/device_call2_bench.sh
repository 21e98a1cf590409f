#!/bin/bash
# device call 2: benchmarks/scaling.py on JAX and torch (GPU) + extras
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
TOK=${TOK:-"1024 4096 16384 65536"}
for b in jax torch; do
  start=$SECONDS
  echo "### KERAS_BACKEND=$b python3 benchmarks/scaling.py --tokens $TOK --out-dir \$OUT/gpu_$b $BARGS" >> $OUT/bench.log
  KERAS_BACKEND=$b timeout ${BTMO:-250} python3 benchmarks/scaling.py --tokens $TOK --out-dir $OUT/gpu_$b $BARGS >> $OUT/bench.log 2>&1
  echo "### rc=$? wall=$((SECONDS-start))s" >> $OUT/bench.log
  nvidia-smi --query-gpu=name,memory.used,memory.total,temperature.gpu,clocks.sm --format=csv >> $OUT/bench.log
done
for b in jax torch; do KERAS_BACKEND=$b timeout 80 python3 .whl/gpu_extra.py >> $OUT/extra.log 2>&1; echo "rc=$?" >> $OUT/extra.log; done
