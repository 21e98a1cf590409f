"""Linear attention kernels written with `keras.ops` only.

All functions take feature-mapped queries and keys (the output of a
`keras_sara.feature_maps.FeatureMap`, non-negative in practice) and values:

    q: (B, T, H, M)   phi(queries)
    k: (B, S, H, M)   phi(keys)
    v: (B, S, H, D)   values

and return `(B, T, H, D)`:

    out_i = phi(q_i)^T Psi / (phi(q_i)^T Gamma + eps)
    Psi   = sum_j phi(k_j) v_j^T      (H, M, D)
    Gamma = sum_j phi(k_j)            (H, M)

where the sums run over all unmasked keys (bidirectional) or over the unmasked
keys `j <= i` (causal). Sums and the normaliser are always accumulated in
float32, whatever the input dtype; the result is cast back to `v.dtype`.

Masked keys (`key_mask[b, j] == False`) contribute nothing. A query row whose
keys are all masked has `Psi = 0` and `Gamma = 0`, so its output is exactly
zero (0 / eps), never NaN.

Psi and Gamma are computed in one contraction by appending a column of ones to
the values: `[Psi | Gamma] = sum_j phi(k_j) [v_j, 1]^T`. This saves one pass
over the queries, which is most of the cost of the core at long lengths.

`keras_sara.ops.naive` holds the slow quadratic reference every function here
is tested against.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

from keras import ops

DEFAULT_EPS = 1e-6
DEFAULT_CHUNK_SIZE = 64
CAUSAL_SCHEDULES = ("parallel", "chunked")


def _shape_str(x) -> str:
    return str(tuple(x.shape))


def validate_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
        raise ValueError(
            "`eps` must be a positive, finite float (it keeps the normaliser "
            f"away from zero). Received: eps={eps!r}"
        )
    return float(eps)


def validate_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0:
        raise ValueError(
            f"`chunk_size` must be a positive integer. Received: chunk_size={chunk_size!r}"
        )
    return int(chunk_size)


def validate_schedule(schedule) -> str:
    if schedule not in CAUSAL_SCHEDULES:
        raise ValueError(
            f"`schedule` must be one of {CAUSAL_SCHEDULES}. Received: schedule={schedule!r}"
        )
    return schedule


def _check_qkv(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise ValueError(
                f"`{name}` must have rank 4, (batch, length, heads, features). "
                f"Received: {name}.shape={_shape_str(x)}"
            )
    if q.shape[-1] is not None and k.shape[-1] is not None and q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "`q` and `k` must have the same feature size (last axis). "
            f"Received: q.shape={_shape_str(q)}, k.shape={_shape_str(k)}"
        )
    if k.shape[1] is not None and v.shape[1] is not None and k.shape[1] != v.shape[1]:
        raise ValueError(
            "`k` and `v` must have the same length (axis 1). "
            f"Received: k.shape={_shape_str(k)}, v.shape={_shape_str(v)}"
        )
    for name, x in (("q", q), ("v", v)):
        if x.shape[0] is not None and k.shape[0] is not None and x.shape[0] != k.shape[0]:
            raise ValueError(
                "`q`, `k` and `v` must have the same batch size (axis 0). "
                f"Received: q.shape={_shape_str(q)}, k.shape={_shape_str(k)}, "
                f"v.shape={_shape_str(v)}"
            )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.shape[2] is not None and k.shape[2] is not None and x.shape[2] != k.shape[2]:
            raise ValueError(
                "`q`, `k` and `v` must have the same number of heads (axis 2). "
                f"Received: q.shape={_shape_str(q)}, k.shape={_shape_str(k)}, "
                f"v.shape={_shape_str(v)}"
            )


def _check_key_mask(key_mask, k) -> None:
    if key_mask is None:
        return
    if len(key_mask.shape) != 2:
        raise ValueError(
            "`key_mask` must have shape (batch, key_length). "
            f"Received: key_mask.shape={_shape_str(key_mask)}"
        )
    if key_mask.shape[1] is not None and k.shape[1] is not None and key_mask.shape[1] != k.shape[1]:
        raise ValueError(
            "`key_mask` length must equal the key length. "
            f"Received: key_mask.shape={_shape_str(key_mask)}, k.shape={_shape_str(k)}"
        )


def _drop_masked_keys(k, v, key_mask, keep_shape):
    """Zero masked keys and values with `where`, not a product: padded
    positions may hold inf/NaN garbage. `keep_shape` reshapes the mask."""
    if key_mask is None:
        return k, v
    keep = ops.reshape(ops.cast(key_mask, "bool"), keep_shape)
    return ops.where(keep, k, ops.zeros_like(k)), ops.where(keep, v, ops.zeros_like(v))


def _prepare(q, k, v, key_mask):
    """float32 copies, masked keys zeroed, values augmented with a ones column."""
    q = ops.cast(q, "float32")
    k = ops.cast(k, "float32")
    v = ops.cast(v, "float32")
    ones = ops.ones_like(v[..., :1])  # (B, S, H, 1)
    v_aug = ops.concatenate([v, ones], axis=-1)  # (B, S, H, D+1)
    k, v_aug = _drop_masked_keys(k, v_aug, key_mask, (ops.shape(k)[0], -1, 1, 1))  # mask (B, S, 1, 1)
    return q, k, v_aug


def _normalise(out_aug, eps, dtype):
    """(..., D+1) numerator|normaliser -> (..., D) in `dtype`."""
    num = out_aug[..., :-1]
    den = out_aug[..., -1:]
    return ops.cast(num / (den + eps), dtype)


def linear_attention(q, k, v, key_mask=None, eps: float = DEFAULT_EPS, check_inputs: bool = False):
    """Bidirectional (non-causal) linear attention, O((T + S) * M * D).

    Contract: `q` and `k` are the outputs of a feature map `phi` (for
    example `keras_sara.feature_maps.get("relu")`), so every entry is
    non-negative and each normaliser `phi(q_t) . sum_s phi(k_s)` is >= 0. This
    function does not apply a feature map: raw signed projections make the
    normaliser change sign or pass near zero, and the output is then
    unbounded (thousands for inputs in [-3, 3]) rather than an average of
    the values. `check_inputs=True` verifies the contract.

    Args:
        q: feature-mapped queries, `(B, T, H, M)`, non-negative.
        k: feature-mapped keys, `(B, S, H, M)`, non-negative.
        v: values, `(B, S, H, D)`.
        key_mask: optional boolean `(B, S)`, False for padded keys.
        eps: positive constant added to the normaliser.
        check_inputs: check that `q` and `k` are finite and non-negative
            and raise a ValueError naming the first that is not (default
            False: the check reads the values, so it needs eager tensors,
            not a traced function).

    Returns:
        `(B, T, H, D)` in `v.dtype`.

    Example:
    >>> import numpy as np
    >>> q = np.random.rand(2, 5, 4, 8).astype("float32")
    >>> k = np.random.rand(2, 7, 4, 8).astype("float32")
    >>> v = np.random.rand(2, 7, 4, 16).astype("float32")
    >>> tuple(linear_attention(q, k, v).shape)
    (2, 5, 4, 16)
    """
    eps = validate_eps(eps)
    q, k, v = ops.convert_to_tensor(q), ops.convert_to_tensor(k), ops.convert_to_tensor(v)
    _check_qkv(q, k, v)
    _check_key_mask(key_mask, k)
    if not isinstance(check_inputs, bool):
        raise ValueError(f"`check_inputs` must be True or False. Received: check_inputs={check_inputs!r}")
    if check_inputs:
        check_feature_mapped(q, "q")
        check_feature_mapped(k, "k")
    dtype = v.dtype
    q, k, v_aug = _prepare(q, k, v, key_mask)
    kv = ops.einsum("bshm,bshd->bhmd", k, v_aug)  # (B, H, M, D+1): [Psi | Gamma]
    out_aug = ops.einsum("bthm,bhmd->bthd", q, kv)  # (B, T, H, D+1)
    return _normalise(out_aug, eps, dtype)


def check_feature_mapped(x, name: str = "x") -> None:
    """Raise a ValueError unless `x` is finite and non-negative, as feature-mapped queries and keys are.

    Reads the values (eager tensors only): for debugging and input checks,
    not inside a traced training step.
    """
    x = ops.convert_to_tensor(x)
    try:
        finite = bool(ops.convert_to_numpy(ops.all(ops.isfinite(x))))
        minimum = float(ops.convert_to_numpy(ops.min(x))) if finite and math.prod(tuple(x.shape)) else 0.0
    except Exception as err:  # a symbolic or traced tensor has no values to read
        raise ValueError(
            f"`{name}` must be a concrete (eager) tensor for the feature-map check; inside a "
            f"traced function pass check_inputs=False. Received: {name} of type {type(x).__name__}"
        ) from err
    if not finite:
        raise ValueError(
            f"`{name}` must be finite. Received: {name} with NaN or infinite values, "
            f"shape {_shape_str(x)}"
        )
    if minimum < 0:
        negative = int(ops.convert_to_numpy(ops.sum(ops.cast(x < 0, "int32"))))
        raise ValueError(
            f"`{name}` must be feature-mapped (non-negative), e.g. "
            f"`keras_sara.feature_maps.get('relu')({name})`: linear attention with signed "
            f"queries or keys has a normaliser that can cross zero. Received: {name} with "
            f"minimum {minimum:.4g} ({negative} negative value(s)), shape {_shape_str(x)}"
        )


def _head_index(heads: int, size: int):
    """`[0]*size + [1]*size + ... + [heads-1]*size` as an int tensor of static shape `(heads*size,)`."""
    per_head = ops.broadcast_to(ops.expand_dims(ops.arange(heads), 1), (heads, size))
    return ops.reshape(per_head, (heads * size,))


def linear_attention_projected(
    q, k, v, output_kernel, key_mask=None, query_mask=None, eps: float = DEFAULT_EPS
):
    """Bidirectional linear attention fused with MHA's output projection.

    Computes `sum_h linear_attention(q, k, v)[:, :, h] @ output_kernel[h]`,
    i.e. attention followed by the `(H, D, E)` output kernel (no bias), but
    with every large tensor kept in the projections' flat `(B, T, H*M)` layout
    so that the work is four plain matmuls and no transposes:

        Psi_all = K^T V                          (B, H*M, H*D), one matmul
        W_eff   = blockdiag(Psi_all) @ W_o       (B, H*M, E),   tiny
        den     = Q @ blockdiag(Gamma)           (B, T, H)
        out     = (Q / (den + eps)) @ W_eff      (B, T, E)

    The per-head normaliser is applied to the queries before the heads are
    summed by the final matmul, which is where the output projection went.
    The cross-head blocks of `K^T V` are computed and discarded: H times
    the minimal flops of that product, cheaper here than the transposes a
    per-head layout needs.

    Args:
        q, k, v, key_mask, eps: as in `linear_attention`.
        output_kernel: `(H, D, E)`, the kernel of MHA's output EinsumDense.
        query_mask: optional boolean `(B, T)`; padded query rows output 0.

    Returns:
        `(B, T, E)` in `v.dtype`.
    """
    eps = validate_eps(eps)
    q, k, v = ops.convert_to_tensor(q), ops.convert_to_tensor(k), ops.convert_to_tensor(v)
    _check_qkv(q, k, v)
    _check_key_mask(key_mask, k)
    dtype = v.dtype
    heads, m, d = q.shape[2], q.shape[3], v.shape[3]
    if tuple(output_kernel.shape[:2]) != (heads, d):
        raise ValueError(
            "`output_kernel` must have shape (heads, value_dim, out). "
            f"Received: output_kernel.shape={tuple(output_kernel.shape)}, v.shape={_shape_str(v)}"
        )
    e = output_kernel.shape[2]
    q, k, v = (ops.cast(x, "float32") for x in (q, k, v))
    k, v = _drop_masked_keys(k, v, key_mask, (ops.shape(k)[0], -1, 1, 1))  # mask (B, S, 1, 1)
    shape_q, shape_k = ops.shape(q), ops.shape(k)
    qf = ops.reshape(q, (shape_q[0], shape_q[1], heads * m))  # (B, T, H*M)
    kf = ops.reshape(k, (shape_k[0], shape_k[1], heads * m))  # (B, S, H*M)
    vf = ops.reshape(v, (shape_k[0], shape_k[1], heads * d))  # (B, S, H*D)
    # block-diagonal selectors: head of each flat feature / value index. Built by broadcast and
    # reshape, whose shapes are static: `ops.repeat` lowers to a data-dependent-shape op on torch,
    # which torch.compile cannot capture (a graph break per call).
    head_m = _head_index(heads, m)  # (H*M,)
    head_d = _head_index(heads, d)  # (H*D,)
    same_head = ops.cast(ops.expand_dims(head_m, 1) == ops.expand_dims(head_d, 0), "float32")  # (H*M, H*D)
    head_onehot = ops.cast(ops.expand_dims(head_m, 1) == ops.expand_dims(ops.arange(heads), 0), "float32")  # (H*M, H)

    psi = ops.einsum("bsi,bsj->bij", kf, vf) * same_head  # (B, H*M, H*D), per-head blocks kept
    w_o = ops.reshape(ops.cast(output_kernel, "float32"), (heads * d, e))  # (H*D, E)
    w_eff = ops.matmul(psi, w_o)  # (B, H*M, E)
    gamma = ops.sum(kf, axis=1)  # (B, H*M)
    den = ops.matmul(qf, ops.expand_dims(gamma, -1) * head_onehot)  # (B, T, H)
    if query_mask is not None:
        # padded queries: den -> inf so their rows come out exactly 0
        den = ops.where(ops.expand_dims(ops.cast(query_mask, "bool"), -1), den, ops.full_like(den, float("inf")))
    scale = 1.0 / (den + eps)  # (B, T, H)
    q_scaled = ops.reshape(q * ops.expand_dims(scale, -1), (shape_q[0], shape_q[1], heads * m))  # (B, T, H*M)
    return ops.cast(ops.matmul(q_scaled, w_eff), dtype)  # (B, T, E)


def linear_attention_split_heads(q_heads, k_heads, v_heads, output_kernel, eps: float = DEFAULT_EPS):
    """Bidirectional linear attention on one tensor per head, output projection included.

    The same result as `linear_attention_projected` (no masks), laid out for
    LiteRT export: the caller projects each head with its own slice of the
    projection kernels, so the graph has no transpose op and the products
    over keys are per head:

        Psi_h = K_h^T V_h,  Gamma_h = K_h^T 1            (B, M, D), (B, M, 1)
        out   = concat_h[(Q_h Psi_h) / (Q_h Gamma_h + eps)] @ W_o

    `K_h^T V_h` is H times smaller than the flat layout's `K^T V` (which
    computes and discards the cross-head blocks), and the output projection
    stays a matmul with constant weights, which int8 conversion turns into a
    fast integer kernel; the flat layout folds it into an
    activation-by-activation product that stays in float. Measured on the
    2-core CPU (4-layer 128-wide encoder, 4,096 tokens, LiteRT, 1 thread):
    float32 101 -> 87 ms, int8 70 -> 57 ms.

    Args:
        q_heads: list of H feature-mapped queries, each `(B, T, M)`.
        k_heads: list of H feature-mapped keys, each `(B, S, M)`.
        v_heads: list of H values, each `(B, S, D)`.
        output_kernel: `(H, D, E)`, the kernel of MHA's output EinsumDense.
        eps: positive constant added to the normaliser.

    Returns:
        `(B, T, E)` in the values' dtype.

    Example:
    >>> import numpy as np
    >>> q = [np.random.rand(2, 5, 8).astype("float32") for _ in range(3)]
    >>> k = [np.random.rand(2, 7, 8).astype("float32") for _ in range(3)]
    >>> v = [np.random.rand(2, 7, 4).astype("float32") for _ in range(3)]
    >>> w = np.random.rand(3, 4, 6).astype("float32")
    >>> tuple(linear_attention_split_heads(q, k, v, w).shape)
    (2, 5, 6)
    """
    eps = validate_eps(eps)
    heads = len(q_heads)
    if heads == 0 or len(k_heads) != heads or len(v_heads) != heads:
        raise ValueError(
            "`q_heads`, `k_heads` and `v_heads` must be non-empty lists of the same length. "
            f"Received: {len(q_heads)}, {len(k_heads)} and {len(v_heads)} tensors"
        )
    q_heads = [ops.convert_to_tensor(x) for x in q_heads]
    k_heads = [ops.convert_to_tensor(x) for x in k_heads]
    v_heads = [ops.convert_to_tensor(x) for x in v_heads]
    for h, (q, k, v) in enumerate(zip(q_heads, k_heads, v_heads)):
        ranks_ok = len(q.shape) == len(k.shape) == len(v.shape) == 3
        if not ranks_ok or q.shape[-1] != k.shape[-1] or k.shape[1] != v.shape[1]:
            raise ValueError(
                "Each head needs q (batch, T, M), k (batch, S, M) and v (batch, S, D). "
                f"Received for head {h}: q.shape={_shape_str(q)}, k.shape={_shape_str(k)}, "
                f"v.shape={_shape_str(v)}"
            )
    m, d = q_heads[0].shape[-1], v_heads[0].shape[-1]
    if tuple(output_kernel.shape[:2]) != (heads, d):
        raise ValueError(
            "`output_kernel` must have shape (heads, value_dim, out). "
            f"Received: output_kernel.shape={tuple(output_kernel.shape)} for {heads} heads "
            f"of value_dim {d}"
        )
    dtype = v_heads[0].dtype
    outs = []
    for q, k, v in zip(q_heads, k_heads, v_heads):
        q, k, v = (ops.cast(x, "float32") for x in (q, k, v))
        psi = ops.einsum("bsm,bsd->bmd", k, v)  # (B, M, D)
        gamma = ops.reshape(ops.sum(k, axis=1), (-1, m, 1))  # (B, M, 1)
        den = ops.matmul(q, gamma)  # (B, T, 1)
        outs.append(ops.matmul(q, psi) * (1.0 / (den + eps)))  # (B, T, D)
    w_o = ops.reshape(ops.cast(output_kernel, "float32"), (heads * d, output_kernel.shape[2]))
    return ops.cast(ops.matmul(ops.concatenate(outs, axis=-1), w_o), dtype)  # (B, T, E)


def causal_linear_attention(
    q,
    k,
    v,
    key_mask=None,
    eps: float = DEFAULT_EPS,
    schedule: str = "parallel",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
):
    """Causal linear attention: query i sees keys j <= i. Needs T == S.

    Args:
        q, k, v, key_mask, eps: as in `linear_attention`.
        schedule: `"parallel"` (one cumulative sum over time; memory
            O(T * M * D) per head) or `"chunked"` (the masked quadratic kernel
            inside chunks of `chunk_size` tokens, plus the (M, D) state
            carried across chunk boundaries by a prefix sum over the T / C
            chunks; memory O(T * C + (T / C) * M * D) per head). Use
            `causal_linear_attention_step` for O(M * D) streaming.
        chunk_size: chunk length of the `"chunked"` schedule.

    Returns:
        `(B, T, H, D)` in `v.dtype`.

    Example:
    >>> import numpy as np
    >>> x = np.random.rand(1, 10, 2, 4).astype("float32")
    >>> a = causal_linear_attention(x, x, x, schedule="parallel")
    >>> b = causal_linear_attention(x, x, x, schedule="chunked", chunk_size=3)
    >>> bool(np.allclose(a, b, atol=1e-5))
    True
    """
    eps = validate_eps(eps)
    schedule = validate_schedule(schedule)
    chunk_size = validate_chunk_size(chunk_size)
    q, k, v = ops.convert_to_tensor(q), ops.convert_to_tensor(k), ops.convert_to_tensor(v)
    _check_qkv(q, k, v)
    _check_key_mask(key_mask, k)
    if q.shape[1] is not None and k.shape[1] is not None and q.shape[1] != k.shape[1]:
        raise ValueError(
            "Causal attention needs as many queries as keys. "
            f"Received: q.shape={_shape_str(q)}, k.shape={_shape_str(k)}"
        )
    if schedule == "parallel":
        return _causal_parallel(q, k, v, key_mask, eps)
    return _causal_chunked(q, k, v, key_mask, eps, chunk_size)


def _causal_parallel(q, k, v, key_mask, eps):
    dtype = v.dtype
    q, k, v_aug = _prepare(q, k, v, key_mask)
    # Broadcast outer product (not an einsum): converts to builtins-only TFLite.
    kv = ops.expand_dims(k, -1) * ops.expand_dims(v_aug, -2)  # (B, T, H, M, D+1)
    kv = ops.cumsum(kv, axis=1)  # prefix sums [Psi_i | Gamma_i]
    out_aug = ops.sum(ops.expand_dims(q, -1) * kv, axis=-2)  # (B, T, H, D+1)
    return _normalise(out_aug, eps, dtype)


def _causal_chunked(q, k, v, key_mask, eps, chunk_size):
    dtype = v.dtype
    q, k, v_aug = _prepare(q, k, v, key_mask)
    shape = ops.shape(q)
    batch, length, heads = shape[0], shape[1], shape[2]
    num_chunks = (length + chunk_size - 1) // chunk_size
    pad = num_chunks * chunk_size - length
    # Zero-padded keys add nothing to any sum; padded queries are cut off below.
    paddings = [[0, 0], [0, pad], [0, 0], [0, 0]]
    q, k, v_aug = (ops.pad(x, paddings) for x in (q, k, v_aug))

    def to_chunks(x):  # (B, N*C, H, F) -> (B, N, C, H, F)
        return ops.reshape(x, (batch, num_chunks, chunk_size, heads, x.shape[-1]))

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v_aug)
    # Inside a chunk: the masked (C, C) kernel, as in the quadratic form.
    idx = ops.arange(chunk_size)
    tril = ops.cast(ops.expand_dims(idx, 1) >= ops.expand_dims(idx, 0), "float32")  # (C, C)
    scores = ops.einsum("bnchm,bnshm->bnhcs", qc, kc) * tril  # (B, N, H, C, C)
    intra = ops.einsum("bnhcs,bnshd->bnchd", scores, vc)  # (B, N, C, H, D+1)
    # Across chunks: the state carried into chunk n is the sum of the states
    # of chunks < n (an exclusive prefix sum over N chunks, not over T tokens).
    chunk_kv = ops.einsum("bnshm,bnshd->bnhmd", kc, vc)  # (B, N, H, M, D+1)
    # Shifted, not `cumsum - chunk_kv`: the subtraction's gradient cancels
    # catastrophically next to a query with no visible key (d out/d num = 1/eps).
    carried = ops.pad(ops.cumsum(chunk_kv, axis=1)[:, :-1], [[0, 0], [1, 0], [0, 0], [0, 0], [0, 0]])  # (B, N, H, M, D+1)
    inter = ops.einsum("bnchm,bnhmd->bnchd", qc, carried)  # (B, N, C, H, D+1)
    out = ops.reshape(intra + inter, (batch, num_chunks * chunk_size, heads, v_aug.shape[-1]))
    return _normalise(out[:, :length], eps, dtype)


def initial_state(batch_size, num_heads: int, feature_dim: int, value_dim: int) -> Tuple:
    """Zero recurrent state `(psi, gamma)`: `(B, H, M, D)` and `(B, H, M)`, float32."""
    psi = ops.zeros((batch_size, num_heads, feature_dim, value_dim), dtype="float32")
    gamma = ops.zeros((batch_size, num_heads, feature_dim), dtype="float32")
    return psi, gamma


def causal_linear_attention_step(
    q_t, k_t, v_t, state: Tuple, key_mask_t=None, eps: float = DEFAULT_EPS
):
    """One recurrent step of causal linear attention, O(M * D) per head.

    Args:
        q_t: feature-mapped query of the new token, `(B, H, M)`.
        k_t: feature-mapped key of the new token, `(B, H, M)`.
        v_t: value of the new token, `(B, H, D)`.
        state: `(psi, gamma)`, `(B, H, M, D)` and `(B, H, M)` float32 prefix
            sums over the previous tokens (`initial_state` for an empty history).
        key_mask_t: optional boolean `(B,)`; False leaves the state unchanged
            (a padded step).
        eps: positive constant added to the normaliser.

    Returns:
        `(out_t, (psi, gamma))`: `(B, H, D)` in `v_t.dtype` and the new state.
        Feeding a sequence through this step token by token reproduces
        `causal_linear_attention` on the whole sequence.
    """
    eps = validate_eps(eps)
    psi, gamma = state
    q_t, k_t, v_t = (ops.convert_to_tensor(x) for x in (q_t, k_t, v_t))
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if len(x.shape) != 3:
            raise ValueError(
                f"`{name}` must have rank 3, (batch, heads, features): one token. "
                f"Received: {name}.shape={_shape_str(x)}"
            )
    if tuple(psi.shape[1:]) != (k_t.shape[1], k_t.shape[2], v_t.shape[2]):
        raise ValueError(
            "`state` does not fit this token: psi must be (batch, heads, features, "
            f"value_dim). Received: psi.shape={_shape_str(psi)}, k_t.shape="
            f"{_shape_str(k_t)}, v_t.shape={_shape_str(v_t)}"
        )
    if key_mask_t is not None and len(ops.convert_to_tensor(key_mask_t).shape) != 1:
        raise ValueError(
            "`key_mask_t` must have shape (batch,). "
            f"Received: key_mask_t.shape={_shape_str(ops.convert_to_tensor(key_mask_t))}"
        )
    dtype = v_t.dtype
    q_t, k_t, v_t = (ops.cast(x, "float32") for x in (q_t, k_t, v_t))
    k_t, v_t = _drop_masked_keys(k_t, v_t, key_mask_t, (-1, 1, 1))  # mask (B, 1, 1)
    psi = psi + ops.expand_dims(k_t, -1) * ops.expand_dims(v_t, -2)  # (B, H, M, D)
    gamma = gamma + k_t  # (B, H, M)
    num = ops.sum(ops.expand_dims(q_t, -1) * psi, axis=-2)  # (B, H, D)
    den = ops.sum(q_t * gamma, axis=-1, keepdims=True)  # (B, H, 1)
    return ops.cast(num / (den + eps), dtype), (psi, gamma)


def linear_attention_weights(
    q, k, key_mask=None, query_mask=None, causal: bool = False, eps: float = DEFAULT_EPS
):
    """The (B, H, T, S) attention matrix that linear attention implies.

    Quadratic in length: a visualisation aid only. Row i holds
    `phi(q_i).phi(k_j) / (sum_j' phi(q_i).phi(k_j') + eps)` over unmasked keys;
    applied to the values it gives exactly what the linear kernels compute.
    """
    eps = validate_eps(eps)
    q, k = ops.convert_to_tensor(q), ops.convert_to_tensor(k)
    _check_qkv(q, k, k)
    _check_key_mask(key_mask, k)
    if causal and q.shape[1] is not None and k.shape[1] is not None and q.shape[1] != k.shape[1]:
        raise ValueError(
            "Causal attention needs as many queries as keys. "
            f"Received: q.shape={_shape_str(q)}, k.shape={_shape_str(k)}"
        )
    q = ops.cast(q, "float32")
    k = ops.cast(k, "float32")
    kernel = ops.einsum("bthm,bshm->bhts", q, k)  # (B, H, T, S)
    mask = _dense_mask(ops.shape(q)[1], ops.shape(k)[1], key_mask, query_mask, causal)
    if mask is not None:
        kernel = ops.where(mask, kernel, ops.zeros_like(kernel))
    return kernel / (ops.sum(kernel, axis=-1, keepdims=True) + eps)


def _dense_mask(t, s, key_mask, query_mask, causal) -> Optional[object]:
    """Boolean mask broadcastable to (B, H, T, S), or None."""
    mask = None
    if key_mask is not None:
        mask = ops.cast(key_mask, "bool")[:, None, None, :]
    if query_mask is not None:
        qm = ops.cast(query_mask, "bool")[:, None, :, None]
        mask = qm if mask is None else ops.logical_and(mask, qm)
    if causal:
        tri = ops.expand_dims(ops.arange(t), 1) >= ops.expand_dims(ops.arange(s), 0)
        tri = tri[None, None]
        mask = tri if mask is None else ops.logical_and(mask, tri)
    return mask
