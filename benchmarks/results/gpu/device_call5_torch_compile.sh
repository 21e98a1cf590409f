#!/bin/bash
# device call 5: benchmarks/scaling.py on torch (GPU) with torch.compile (--jit-compile true)
# against eager, same session. PART=1: eager rerun + compiled encoder (harness wrapper below);
# PART=2: scaling.py --jit-compile true as is (no wrapper, encoder) + compiled attention (wrapper).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export KERAS_BACKEND=torch
TOK=${TOK:-"1024 4096 16384 65536"}
LOG=$OUT/compile.log
# Harness-only wrapper (no library or Keras change): see its docstring.
cat > /tmp/compile_wrap.py <<'EOF'
"""Run benchmarks/scaling.py with three harness-only changes for torch.compile:
1. torch._dynamo.reset() before every model, so each model starts with empty dynamo
   caches (the script compiles 12-24 models in one process; a user compiles one);
2. torch._dynamo.config.recompile_limit raised from 8 to $RECOMPILE_LIMIT (64): Keras
   runs every layer through the same `forward` code object, one cache entry per layer;
3. FloorAttention's call counter (a class attribute bumped on every call: dynamo guards
   on it and recompiles the floor model on every call) is dropped after the routing check.
Prints dynamo's counters (graphs, graph breaks by reason) per model."""
import collections, os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch, torch._dynamo
from torch._dynamo.utils import counters
torch._dynamo.config.recompile_limit = int(os.environ.get("RECOMPILE_LIMIT", "64"))
import scaling

scaling.check_floor_routing()  # with the counter, as the script does
def _compute_attention(self, query, key, value, attention_mask=None, training=None,
                       return_attention_scores=False, use_causal_mask=False):
    return query + key + value, None
scaling.FloorAttention._compute_attention = _compute_attention
scaling.check_floor_routing = lambda: None  # checked above

_measure = scaling.measure_group
def measure_group(model_name, tokens, variants, cfg):
    out = []
    for v in variants:  # one variant at a time: counters per model (round robin lost)
        torch._dynamo.reset(); counters.clear()
        out += _measure(model_name, tokens, [v], cfg)
        reasons = collections.Counter()
        for k, n in counters["graph_break"].items():
            reasons[k.splitlines()[0][:120]] += n
        print(f"    dynamo {model_name}/{v} N={tokens}: unique_graphs="
              f"{counters['stats'].get('unique_graphs', 0)} frames_ok={counters['frames'].get('ok', 0)} "
              f"graph_breaks={sum(reasons.values())} {dict(reasons.most_common())}", flush=True)
    return out
scaling.measure_group = measure_group
sys.argv = [os.path.abspath(__file__)] + sys.argv[1:]
scaling.main()
EOF
run() {  # run NAME TIMEOUT CMD...
  local name=$1 tmo=$2; shift 2; local start=$SECONDS
  echo "### [$name] KERAS_BACKEND=torch $*" >> $LOG
  timeout $tmo "$@" >> $LOG 2>&1
  echo "### [$name] rc=$? wall=$((SECONDS-start))s" >> $LOG
  nvidia-smi --query-gpu=name,memory.used,temperature.gpu,clocks.sm --format=csv,noheader >> $LOG
}
python3 -c "import torch, keras; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'keras', keras.__version__)" >> $LOG 2>&1
# Compiled runs: one process per token count (a timeout loses only that size); sizes
# are skipped once fewer than 90 s are left before DEADLINE (seconds since start).
per_size() {  # per_size NAME PROGRAM ARGS... (tokens appended)
  local name=$1; shift
  for n in $TOK; do
    left=$(( ${DEADLINE:-520} - SECONDS ))
    if [ $left -lt 90 ]; then echo "### [$name N=$n] not run: ${left}s left" >> $LOG; continue; fi
    run "$name N=$n" $(( left < 240 ? left : 240 )) "$@" --tokens $n --out-dir $OUT/$name/N$n
  done
}
if [ "${PART:-1}" = 1 ]; then
  run eager ${ETMO:-150} python3 benchmarks/scaling.py --tokens $TOK --memory-tokens 0 --jit-compile false --out-dir $OUT/eager
  per_size compile python3 /tmp/compile_wrap.py --models encoder --warmup 3 --memory-tokens 0 --jit-compile true
elif [ "$PART" = 3 ]; then  # call 5b: only 8 files come back from a call: redo what was lost, tarred
  ls -R $OUT /root/out 2>/dev/null | head -20 >> $LOG
  [ -d /root/out/eager ] && [ "$OUT" != /root/out ] && tar czf $OUT/call1_leftover.tgz -C /root/out eager compile
  run eager ${ETMO:-150} python3 benchmarks/scaling.py --tokens $TOK --memory-tokens 0 --jit-compile false --out-dir $OUT/eager
  TOK=${CTOK:-"65536 4096"} per_size compile python3 /tmp/compile_wrap.py --models encoder --warmup 3 --memory-tokens 0 --jit-compile true
  (cd $OUT && tar czf results.tgz eager compile && rm -rf eager compile)
else
  run compile_as_is ${ATMO:-200} python3 benchmarks/scaling.py --tokens ${ATOK:-$TOK} --models encoder --memory-tokens 0 --jit-compile true --out-dir $OUT/compile_as_is
  per_size compile_attention python3 /tmp/compile_wrap.py --models attention --warmup 3 --memory-tokens 0 --jit-compile true
fi
