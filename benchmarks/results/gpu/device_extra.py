"""Extras for the GPU scaling run: host<->device transfer cost of the (1, N, 128) float32
input/output, and (torch) device-resident forward time + peak CUDA memory per variant."""
import os, sys, time
import numpy as np
b = os.environ["KERAS_BACKEND"]
import keras
sys.path.insert(0, ".")
from benchmarks.scaling import build_model

def med(f, n=20):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))

for n in (1024, 4096, 16384, 65536):
    x = np.random.default_rng(0).standard_normal((1, n, 128)).astype("float32")
    if b == "torch":
        import torch
        f = lambda: torch.from_numpy(x).cuda().cpu().numpy()
    else:
        import jax
        f = lambda: np.asarray(jax.device_put(x) + 0)
    f()
    print(f"[{b}] transfer H2D+D2H of (1,{n},128) f32 ({x.nbytes/2**20:.1f} MiB): median {med(f):.2f} ms", flush=True)

if b == "torch":
    import torch
    for variant, n in [("floor", 16384), ("sara", 16384), ("softmax", 16384), ("floor", 65536), ("sara", 65536)]:
        m = build_model("encoder", variant, n)
        x = torch.randn(1, n, 128, device="cuda")
        with torch.no_grad():
            m(x, training=False); torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ts = []
            for _ in range(20):
                s.record(); m(x, training=False); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(f"[torch] encoder/{variant} N={n}: device-resident forward median {np.median(ts):.2f} ms (CUDA events, no_grad), peak CUDA alloc above weights+input {peak:.0f} MiB", flush=True)
        del m, x; keras.backend.clear_session(); torch.cuda.empty_cache()
