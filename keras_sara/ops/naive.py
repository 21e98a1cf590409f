"""Slow, obviously-correct references for the kernels in `linear_attention`.

Every fast schedule in `keras_sara.ops.kernels` is tested against the
functions here. They take the same feature-mapped inputs,

    q: (B, T, H, M)   phi(queries)
    k: (B, S, H, M)   phi(keys)
    v: (B, S, H, D)   values

but never factor the sums: they materialise the (B, H, T, S) kernel matrix
`A[t, s] = phi(q_t).phi(k_s)` in float32 and normalise each row,

    out_t = sum_s A[t, s] v_s / (sum_s A[t, s] + eps),

with the causal form written as a Python loop over t that only ever looks at
keys s <= t. Quadratic time and memory: for tests and small inputs only.

Masked keys (`key_mask[b, s] == False`) are removed with `ops.where`, never by
multiplying with the mask, so NaN or inf held in padded positions cannot reach
the result (0 * NaN is NaN). A row with no visible key gives exactly 0.
"""

from __future__ import annotations

from keras import ops


def _kernel_matrix(q, k, v, key_mask):
    """float32 copies of q, k, v with masked keys removed, and A = phi(q).phi(k)."""
    q = ops.cast(q, "float32")
    k = ops.cast(k, "float32")
    if v is not None:
        v = ops.cast(v, "float32")
    if key_mask is not None:
        keep = ops.cast(key_mask, "bool")  # (B, S)
        keep_kv = ops.expand_dims(ops.expand_dims(keep, -1), -1)  # (B, S, 1, 1)
        # Clear garbage from k and v themselves, not only from A: a NaN key
        # would otherwise reach the gradient of q through A = q.k.
        k = ops.where(keep_kv, k, ops.zeros_like(k))
        if v is not None:
            v = ops.where(keep_kv, v, ops.zeros_like(v))
    a = ops.einsum("bthm,bshm->bhts", q, k)  # (B, H, T, S)
    if key_mask is not None:
        keep_a = ops.expand_dims(ops.expand_dims(keep, 1), 1)  # (B, 1, 1, S)
        a = ops.where(keep_a, a, ops.zeros_like(a))
    return a, v


def naive_linear_attention(q, k, v, key_mask=None, causal: bool = False, eps: float = 1e-6):
    """Linear attention through the explicit (B, H, T, S) kernel matrix.

    Args:
        q: feature-mapped queries, `(B, T, H, M)`.
        k: feature-mapped keys, `(B, S, H, M)`.
        v: values, `(B, S, H, D)`.
        key_mask: optional boolean `(B, S)`, False for padded keys.
        causal: if True, query t sees keys s <= t only (needs T == S).
        eps: positive constant added to each row's normaliser.

    Returns:
        `(B, T, H, D)` in `v.dtype`.
    """
    v = ops.convert_to_tensor(v)
    dtype = v.dtype
    a, v = _kernel_matrix(q, k, v, key_mask)  # (B, H, T, S), (B, S, H, D)
    if not causal:
        num = ops.einsum("bhts,bshd->bthd", a, v)  # (B, T, H, D)
        den = ops.transpose(ops.sum(a, axis=-1), (0, 2, 1))  # (B, T, H)
        out = num / (ops.expand_dims(den, -1) + eps)  # (B, T, H, D)
        return ops.cast(out, dtype)

    key_pos = ops.arange(a.shape[3])  # (S,)
    rows = []
    # Row t by `take` and future keys dropped by `where`, not by slicing: every
    # step then has the same shapes and a gather-shaped gradient, which keeps
    # the loop cheap on every backend (a slice a[:, :, t, :t+1] costs a full
    # (B, H, T, S) gradient per step in TensorFlow and a compilation per step
    # in JAX).
    for t in range(a.shape[2]):
        a_t = ops.take(a, t, axis=2)  # (B, H, S): row t of the kernel matrix
        a_t = ops.where(key_pos <= t, a_t, ops.zeros_like(a_t))  # keys 0..t only
        num = ops.einsum("bhs,bshd->bhd", a_t, v)  # (B, H, D)
        den = ops.sum(a_t, axis=-1, keepdims=True)  # (B, H, 1)
        rows.append(num / (den + eps))
    out = ops.stack(rows, axis=1)  # (B, T, H, D)
    return ops.cast(out, dtype)


def naive_linear_attention_weights(
    q, k, key_mask=None, query_mask=None, causal: bool = False, eps: float = 1e-6
):
    """The normalised (B, H, T, S) matrix whose product with v is the output.

    Args:
        q: feature-mapped queries, `(B, T, H, M)`.
        k: feature-mapped keys, `(B, S, H, M)`.
        key_mask: optional boolean `(B, S)`, False for padded keys.
        query_mask: optional boolean `(B, T)`; False zeroes the whole row.
        causal: if True, entries with s > t are zero.
        eps: positive constant added to each row's normaliser.

    Returns:
        float32 `(B, H, T, S)`; row t is `A[t] / (sum_s A[t, s] + eps)`.
    """
    a, _ = _kernel_matrix(q, k, None, key_mask)  # (B, H, T, S)
    t_len, s_len = a.shape[2], a.shape[3]
    if query_mask is not None:
        keep_q = ops.cast(query_mask, "bool")[:, None, :, None]  # (B, 1, T, 1)
        a = ops.where(keep_q, a, ops.zeros_like(a))
    if causal:
        lower = ops.cast(ops.tril(ops.ones((t_len, s_len))), "bool")  # (T, S)
        a = ops.where(lower[None, None], a, ops.zeros_like(a))
    den = ops.sum(a, axis=-1, keepdims=True)  # (B, H, T, 1)
    return a / (den + eps)


def naive_structured_linear_attention(
    q, k, v, mask=None, q_rot=None, k_rot=None, eps: float = 1e-6
):
    """Grouped-query linear attention (rotary numerator optional) under a dense mask.

    The reference of `keras_sara.ops.structured`: key/value heads are
    repeated to the query heads (as Llama does), the numerator and
    normaliser kernel matrices are materialised, and each query row is
    computed on its own in a Python loop.

    Args:
        q: feature-mapped queries, `(B, T, N, M)`.
        k: feature-mapped keys, `(B, S, K, M)`, N a multiple of K.
        v: values, `(B, S, K, D)`.
        mask: optional boolean `(B, T, S)`, True = visible.
        q_rot, k_rot: optional rotated features for the numerator.
        eps: positive constant added to each row's normaliser.

    Returns:
        `(B, T, N, D)` in `v.dtype`.
    """
    v = ops.convert_to_tensor(v)
    dtype = v.dtype
    groups = q.shape[2] // k.shape[2]
    q, k, v = (ops.cast(x, "float32") for x in (q, k, v))
    k = ops.repeat(k, groups, axis=2)  # (B, S, N, M)
    v = ops.repeat(v, groups, axis=2)  # (B, S, N, D)
    q_num = q if q_rot is None else ops.cast(q_rot, "float32")
    k_num = k if k_rot is None else ops.repeat(ops.cast(k_rot, "float32"), groups, axis=2)
    rows = []
    for t in range(q.shape[1]):
        den_t = ops.einsum("bnm,bsnm->bns", q[:, t], k)  # (B, N, S)
        num_t = ops.einsum("bnm,bsnm->bns", q_num[:, t], k_num)  # (B, N, S)
        v_t = v
        if mask is not None:
            keep = ops.cast(mask, "bool")[:, t][:, None, :]  # (B, 1, S)
            den_t = ops.where(keep, den_t, ops.zeros_like(den_t))
            num_t = ops.where(keep, num_t, ops.zeros_like(num_t))
            v_t = ops.where(ops.transpose(keep, (0, 2, 1))[..., None], v, ops.zeros_like(v))  # (B, S, N, D)
        out_t = ops.einsum("bns,bsnd->bnd", num_t, v_t) / (ops.sum(den_t, axis=-1)[..., None] + eps)
        rows.append(out_t)
    return ops.cast(ops.stack(rows, axis=1), dtype)  # (B, T, N, D)
