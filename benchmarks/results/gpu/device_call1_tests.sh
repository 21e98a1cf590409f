#!/bin/bash
# device call 1: environment + multi-backend test suite on JAX and torch (GPU)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
T="tests/ops tests/layers tests/test_feature_maps.py tests/conversion tests/test_callbacks.py tests/test_pct_policy.py tests/test_streaming.py"
NW=${NW:-8}
python3 -c "import xdist" 2>/dev/null && NOPT="-n $NW" || NOPT=""
{
  date -u; nvidia-smi; nproc; python3 --version
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices(), jax.default_backend()); print('jax_default_matmul_precision', jax.config.jax_default_matmul_precision)"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name()); print('allow_tf32(matmul)', torch.backends.cuda.matmul.allow_tf32, 'cudnn.allow_tf32', torch.backends.cudnn.allow_tf32, 'fp32 matmul precision', torch.get_float32_matmul_precision())"
  for b in jax torch; do KERAS_BACKEND=$b python3 -c "
import keras, numpy
x = keras.ops.ones(2); d = x.device; d = d() if callable(d) else d
print(keras.backend.backend(), 'keras', keras.__version__, 'numpy', numpy.__version__, 'ones(2) on', d)
l = keras.layers.Dense(3); y = l(keras.ops.ones((1, 4)))
v = l.kernel.value; dv = v.device; dv = dv() if callable(dv) else dv
print('  Dense output device', (y.device() if callable(y.device) else y.device), 'kernel device', dv)"; done
  python3 -c "import tensorflow" 2>&1 | tail -1
  python3 -c "import keras_hub" 2>&1 | tail -1
  python3 -m pip list 2>/dev/null | grep -i -E "^(pytest|pytest-xdist|numpy|jax|jaxlib|torch|keras|optree|namex) "
} > $OUT/env.log 2>&1
for b in jax torch; do
  log=$OUT/pytest_$b.log
  start=$SECONDS
  KERAS_BACKEND=$b timeout ${TMO:-230} python3 -m pytest -q -p no:cacheprovider $NOPT -rfEs --durations=15 $T > $log 2>&1
  echo "rc=$? wall=$((SECONDS-start))s opts=$NOPT" >> $log
  grep -oP '^(FAILED|ERROR) \K\S+' $log | sort -u > /tmp/failed_$b.txt
  if [ -s /tmp/failed_$b.txt ] && [ $SECONDS -lt 470 ]; then
    { echo "=== rerun failed, serial, default precision"; KERAS_BACKEND=$b timeout 45 python3 -m pytest -q -p no:cacheprovider -rfE $(head -20 /tmp/failed_$b.txt) 2>&1 | tail -n 40
      echo "=== rerun failed, serial, TF32 off (NVIDIA_TF32_OVERRIDE=0 JAX_DEFAULT_MATMUL_PRECISION=highest)"
      NVIDIA_TF32_OVERRIDE=0 JAX_DEFAULT_MATMUL_PRECISION=highest KERAS_BACKEND=$b timeout 45 python3 -m pytest -q -p no:cacheprovider -rfE $(head -20 /tmp/failed_$b.txt) 2>&1 | tail -n 40
    } > $OUT/rerun_$b.log 2>&1
  fi
done
