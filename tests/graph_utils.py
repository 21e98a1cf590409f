"""Record the shape of every intermediate tensor a function builds, per backend.

Used to prove that a code path never materialises a (T, S) tensor: trace the
function and look at every op's output shape.
"""

import keras

from tests.backend_utils import backend


def intermediate_shapes(fn, *args):
    """Set of shapes (tuples of ints, None for unknown) of every op output of `fn(*args)`."""
    name = backend()
    shapes = set()
    if name == "tensorflow":
        import tensorflow as tf

        graph = tf.function(fn).get_concrete_function(*[tf.constant(a) for a in args]).graph

        def visit(g):
            for op in g.get_operations():
                for out in op.outputs:
                    if out.shape.rank is not None:
                        shapes.add(tuple(out.shape.as_list()))
                for attr in ("then_branch", "else_branch", "body", "cond", "f"):
                    try:
                        fname = op.get_attr(attr).name
                    except (ValueError, AttributeError, TypeError):
                        continue
                    sub = g._get_function(fname)
                    if sub is not None:
                        visit(sub.graph)

        visit(graph)
    elif name == "jax":
        import jax

        def visit(jaxpr):
            for eqn in jaxpr.eqns:
                for var in eqn.outvars:
                    shapes.add(tuple(getattr(var.aval, "shape", ())))
                for param in eqn.params.values():
                    for sub in param if isinstance(param, (list, tuple)) else (param,):
                        inner = getattr(sub, "jaxpr", sub)
                        if hasattr(inner, "eqns"):
                            visit(inner)

        visit(jax.make_jaxpr(fn)(*args).jaxpr)
    elif name == "torch":
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (list, tuple)) else (out,):
                    if isinstance(t, torch.Tensor):
                        shapes.add(tuple(t.shape))
                return out

        tensors = [keras.ops.convert_to_tensor(a) for a in args]
        with torch.no_grad(), Record():
            fn(*tensors)
    else:
        raise ValueError(f"Unsupported backend. Received: backend={name!r}")
    return shapes


def has_square(shapes, n):
    """True if any shape has two axes of size n (a (T, T) block)."""
    return any(sum(1 for d in s if d == n) >= 2 for s in shapes)
