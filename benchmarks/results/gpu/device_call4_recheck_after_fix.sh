#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/recheck.log
T="tests/ops tests/layers tests/test_feature_maps.py tests/conversion tests/test_callbacks.py tests/test_pct_policy.py tests/test_streaming.py tests/test_utils.py"
for b in jax torch; do
  echo "== $b finalize at default precision" | tee -a $OUT/recheck.log
  KERAS_BACKEND=$b timeout 120 python3 .whl/gpu_finalize.py 2>&1 | grep -v Warning | tee -a $OUT/recheck.log
done
for b in torch jax; do
  start=$SECONDS
  KERAS_BACKEND=$b timeout 260 python3 -m pytest -q -p no:cacheprovider -n 8 -rfE $T > $OUT/pytest_$b.log 2>&1
  echo "== $b suite rc=$? wall=$((SECONDS-start))s: $(tail -1 $OUT/pytest_$b.log)" | tee -a $OUT/recheck.log
done
