#!/bin/bash
# device call 3: confirm the JAX failures are TF32; torch suite with the test helper's device bug patched (plugin)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.:.whl || exit
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
T="tests/ops tests/layers tests/test_feature_maps.py tests/conversion tests/test_callbacks.py tests/test_pct_policy.py tests/test_streaming.py"
start=$SECONDS; log=$OUT/pytest_jax_highest.log
JAX_DEFAULT_MATMUL_PRECISION=highest python3 -c "import jax; print('jax_default_matmul_precision =', jax.config.jax_default_matmul_precision)" > $log 2>&1
JAX_DEFAULT_MATMUL_PRECISION=highest KERAS_BACKEND=jax timeout 230 python3 -m pytest -q -p no:cacheprovider -n 8 -rfE $T >> $log 2>&1
echo "rc=$? wall=$((SECONDS-start))s" >> $log
for mode in default tf32off; do
  start=$SECONDS; log=$OUT/pytest_torch_fixed_$mode.log
  if [ $mode = tf32off ]; then export NVIDIA_TF32_OVERRIDE=0; fi
  KERAS_BACKEND=torch timeout 120 python3 -m pytest -q -p no:cacheprovider -p gpu_torch_device_fix -n 8 -rfE $T > $log 2>&1
  echo "rc=$? wall=$((SECONDS-start))s NVIDIA_TF32_OVERRIDE=${NVIDIA_TF32_OVERRIDE:-unset}" >> $log
  grep -q " failed" $log || break
done
