"""pytest plugin (diagnosis only, not part of the repo): tests/backend_utils.value_and_grads
builds its torch inputs and cotangent on the CPU, so on a CUDA machine `out * cotangent`
mixes cuda:0 and cpu. This patch puts them on Keras' torch device, to see the numerics."""
import keras

if keras.backend.backend() == "torch":
    import torch
    import tests.backend_utils as bu
    from keras.src.backend.torch.core import get_device

    def value_and_grads(fn, inputs, cotangent, jit=True):
        dev = get_device()
        xs = [torch.tensor(x, requires_grad=True, device=dev) for x in inputs]
        out = fn(*xs)
        loss = (out * torch.as_tensor(cotangent, dtype=out.dtype, device=out.device)).sum()
        grads = torch.autograd.grad(loss, xs, allow_unused=True, materialize_grads=True)
        return bu.to_numpy(out.detach()), [bu.to_numpy(g) for g in grads]

    bu.value_and_grads = value_and_grads
    print("gpu_torch_device_fix: patched tests.backend_utils.value_and_grads, device", get_device())
