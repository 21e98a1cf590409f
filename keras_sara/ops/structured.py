"""Linear attention for keras-hub's attention layers: grouped heads, rotary numerator, prefix-causal masks.

keras-hub's decoders (Gemma, the Llama family, PaliGemma, GPT-2) differ from
`keras.layers.MultiHeadAttention` in three ways that the kernels here handle
while staying linear in length:

- **Grouped-query heads.** Queries have N heads, keys and values K <= N
  (N = K * G). The linear state `(Psi, Gamma)` is kept once per key/value
  head and shared by its G query heads, so the memory saving of GQA stays.
- **Rotary position embeddings.** Linear attention needs a non-negative
  kernel, and a rotation does not keep features non-negative. Following
  RoFormer (Su et al. 2021, section 3.4), the numerator uses rotated
  feature-mapped queries and keys, the normaliser the unrotated ones:

      out_t = sum_s (R_t phi(q_t)).(R_s phi(k_s)) v_s / (sum_s phi(q_t).phi(k_s) + eps)

  Without rotation both are the same features and one pass computes both.
- **Prefix-causal masks.** keras-hub hands its attention a dense boolean
  `(B, T, S)` mask that it built itself: causal with key padding (Gemma,
  Llama, GPT-2), or PaliGemma's prefix-LM mask (image and prompt tokens
  visible to every query, response tokens causal). Both have the form

      visible[t, s] = bidirectional_keys[s] or (causal_keys[s] and s <= t)

  which is linear: a bidirectional state over the first set of keys plus a
  causal prefix sum over the second. `split_prefix_causal_mask` reads the two
  key sets off a dense mask and says whether the mask has that form at all;
  any other mask is honoured exactly by `masked_kernel_attention`, the
  (T, S) kernel matrix, at quadratic cost.

Shapes (M is the feature size, D the value size):

    q: (B, T, N, M)   phi(queries)       q_rot: same, rotated (or None)
    k: (B, S, K, M)   phi(keys)          k_rot: same, rotated (or None)
    v: (B, S, K, D)   values

Sums and the normaliser are accumulated in float32; results come back in
`v.dtype`. A query that sees no key outputs exactly 0. Masked keys are
removed with `where`, so NaN held in padded positions cannot leak in.
`keras_sara.ops.naive.naive_structured_linear_attention` is the quadratic
reference every function here is tested against.
"""

from __future__ import annotations

from keras import ops

from keras_sara.ops.kernels import DEFAULT_CHUNK_SIZE, DEFAULT_EPS, validate_chunk_size, validate_eps


def _shape_str(x) -> str:
    return str(tuple(x.shape))


def _check(q, k, v, q_rot, k_rot):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise ValueError(
                f"`{name}` must have rank 4, (batch, length, heads, features). "
                f"Received: {name}.shape={_shape_str(x)}"
            )
    n, kh = q.shape[2], k.shape[2]
    if n is not None and kh is not None and (n % kh != 0 or v.shape[2] != kh):
        raise ValueError(
            "`q` must have a multiple of the key/value heads of `k` and `v` (grouped-query "
            f"attention). Received: q.shape={_shape_str(q)}, k.shape={_shape_str(k)}, "
            f"v.shape={_shape_str(v)}"
        )
    if q.shape[-1] is not None and k.shape[-1] is not None and q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "`q` and `k` must have the same feature size (last axis). "
            f"Received: q.shape={_shape_str(q)}, k.shape={_shape_str(k)}"
        )
    if (q_rot is None) != (k_rot is None):
        raise ValueError(
            "`q_rot` and `k_rot` go together (the rotated numerator needs both). "
            f"Received: q_rot={'None' if q_rot is None else _shape_str(q_rot)}, "
            f"k_rot={'None' if k_rot is None else _shape_str(k_rot)}"
        )
    for name, x, ref in (("q_rot", q_rot, q), ("k_rot", k_rot, k)):
        if x is not None and tuple(x.shape) != tuple(ref.shape):
            raise ValueError(
                f"`{name}` must have the shape of `{name[0]}`. "
                f"Received: {name}.shape={_shape_str(x)}, {name[0]}.shape={_shape_str(ref)}"
            )


def _group(q, heads_kv):
    """(B, T, N, M) -> (B, T, K, G, M): query head n = k * G + g, as keras-hub groups them."""
    shape = ops.shape(q)
    return ops.reshape(q, (shape[0], shape[1], heads_kv, q.shape[2] // heads_kv, q.shape[3]))


def _keep(x, mask):
    """Zero keys (B, S, K, F) where `mask` (B, S) is False; None keeps all."""
    if mask is None:
        return x
    mask = ops.cast(mask, "bool")
    keep = ops.reshape(mask, (ops.shape(mask)[0], ops.shape(mask)[1], 1, 1))  # (B or 1, S, 1, 1)
    return ops.where(keep, x, ops.zeros_like(x))


def _bidirectional_sums(qg, k, vals):
    """sum_s (q_t . k_s) vals_s over all (already masked) keys: (B, T, K, G, F)."""
    kv = ops.einsum("bskm,bskf->bkmf", k, vals)  # (B, K, M, F)
    return ops.einsum("btkgm,bkmf->btkgf", qg, kv)


def _causal_sums(qg, k, vals, chunk_size):
    """sum_{s <= t} (q_t . k_s) vals_s, chunked: (B, T, K, G, F). Needs T == S."""
    shape = ops.shape(qg)
    batch, length = shape[0], shape[1]
    heads_kv, groups, m, f = qg.shape[2], qg.shape[3], qg.shape[4], vals.shape[3]
    num_chunks = (length + chunk_size - 1) // chunk_size
    pad = num_chunks * chunk_size - length
    # Zero-padded keys add nothing; padded queries are cut off below.
    qg = ops.pad(qg, [[0, 0], [0, pad], [0, 0], [0, 0], [0, 0]])
    k = ops.pad(k, [[0, 0], [0, pad], [0, 0], [0, 0]])
    vals = ops.pad(vals, [[0, 0], [0, pad], [0, 0], [0, 0]])
    qc = ops.reshape(qg, (batch, num_chunks, chunk_size, heads_kv, groups, m))  # (B, N, C, K, G, M)
    kc = ops.reshape(k, (batch, num_chunks, chunk_size, heads_kv, m))  # (B, N, C, K, M)
    vc = ops.reshape(vals, (batch, num_chunks, chunk_size, heads_kv, f))  # (B, N, C, K, F)
    idx = ops.arange(chunk_size)
    tril = ops.cast(ops.expand_dims(idx, 1) >= ops.expand_dims(idx, 0), "float32")  # (C, C)
    scores = ops.einsum("bnckgm,bnskm->bnkgcs", qc, kc) * tril  # (B, N, K, G, C, C)
    intra = ops.einsum("bnkgcs,bnskf->bnckgf", scores, vc)  # (B, N, C, K, G, F)
    chunk_kv = ops.einsum("bnskm,bnskf->bnkmf", kc, vc)  # (B, N, K, M, F)
    # Exclusive prefix sum over chunks, by shifting (not `cumsum - chunk_kv`,
    # whose gradient cancels catastrophically next to a query with no key).
    carried = ops.pad(ops.cumsum(chunk_kv, axis=1)[:, :-1], [[0, 0], [1, 0], [0, 0], [0, 0], [0, 0]])
    inter = ops.einsum("bnckgm,bnkmf->bnckgf", qc, carried)  # (B, N, C, K, G, F)
    out = ops.reshape(intra + inter, (batch, num_chunks * chunk_size, heads_kv, groups, f))
    return out[:, :length]


def _sums(qg, k, vals, bidirectional_keys, causal_keys, chunk_size):
    """Unnormalised sums over the visible keys: bidirectional part plus causal part."""
    if causal_keys is None:
        return _bidirectional_sums(qg, _keep(k, bidirectional_keys), _keep(vals, bidirectional_keys))
    out = _causal_sums(qg, _keep(k, causal_keys), _keep(vals, causal_keys), chunk_size)
    if bidirectional_keys is not None:
        out = out + _bidirectional_sums(qg, _keep(k, bidirectional_keys), _keep(vals, bidirectional_keys))
    return out


def structured_linear_attention(
    q,
    k,
    v,
    bidirectional_keys=None,
    causal_keys=None,
    q_rot=None,
    k_rot=None,
    eps: float = DEFAULT_EPS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
):
    """Grouped-query linear attention under a prefix-causal mask, O((T + S) * M * D).

    Query t sees key s when `bidirectional_keys[s]`, or when `causal_keys[s]`
    and `s <= t`. With neither mask every key is seen (bidirectional
    attention). Only `bidirectional_keys`: key padding. Only `causal_keys`:
    causal attention over those keys (all ones: plain causal). Both:
    PaliGemma's prefix-LM mask. Keys in both sets count once (as
    bidirectional).

    Args:
        q: feature-mapped queries, `(B, T, N, M)`.
        k: feature-mapped keys, `(B, S, K, M)`; N must be a multiple of K.
        v: values, `(B, S, K, D)`.
        bidirectional_keys: optional boolean `(B, S)`.
        causal_keys: optional boolean `(B, S)`; needs T == S.
        q_rot, k_rot: optional rotated features for the numerator (RoPE),
            shaped as `q` and `k`; the normaliser uses `q` and `k`.
        eps: positive constant added to the normaliser.
        chunk_size: chunk length of the causal prefix sum.

    Returns:
        `(B, T, N, D)` in `v.dtype`.

    Example:
    >>> import numpy as np
    >>> q = np.random.rand(2, 5, 4, 8).astype("float32")   # 4 query heads
    >>> k = np.random.rand(2, 5, 2, 8).astype("float32")   # 2 key/value heads
    >>> v = np.random.rand(2, 5, 2, 3).astype("float32")
    >>> tuple(structured_linear_attention(q, k, v, causal_keys=np.ones((2, 5), bool)).shape)
    (2, 5, 4, 3)
    """
    eps = validate_eps(eps)
    chunk_size = validate_chunk_size(chunk_size)
    q, k, v = (ops.convert_to_tensor(x) for x in (q, k, v))
    q_rot = None if q_rot is None else ops.convert_to_tensor(q_rot)
    k_rot = None if k_rot is None else ops.convert_to_tensor(k_rot)
    _check(q, k, v, q_rot, k_rot)
    dtype = v.dtype
    heads_kv = k.shape[2]
    if causal_keys is not None and bidirectional_keys is not None:
        # a key in both sets is seen by every query: keep it bidirectional only
        causal_keys = ops.logical_and(ops.cast(causal_keys, "bool"), ops.logical_not(ops.cast(bidirectional_keys, "bool")))
    q, k, v = (ops.cast(x, "float32") for x in (q, k, v))
    ones = ops.ones_like(v[..., :1])  # (B, S, K, 1)
    if q_rot is None:
        v_aug = ops.concatenate([v, ones], axis=-1)  # (B, S, K, D+1): [Psi | Gamma] in one pass
        out = _sums(_group(q, heads_kv), k, v_aug, bidirectional_keys, causal_keys, chunk_size)
        num, den = out[..., :-1], out[..., -1:]
    else:
        q_rot, k_rot = ops.cast(q_rot, "float32"), ops.cast(k_rot, "float32")
        num = _sums(_group(q_rot, heads_kv), k_rot, v, bidirectional_keys, causal_keys, chunk_size)
        den = _sums(_group(q, heads_kv), k, ones, bidirectional_keys, causal_keys, chunk_size)
    out = num / (den + eps)  # (B, T, K, G, D)
    shape = ops.shape(out)
    return ops.cast(ops.reshape(out, (shape[0], shape[1], heads_kv * out.shape[3], out.shape[4])), dtype)


def masked_kernel_attention(q, k, v, mask=None, q_rot=None, k_rot=None, eps: float = DEFAULT_EPS):
    """Exact linear attention under any dense mask, through the (T, S) kernel matrix.

    Quadratic in length: the path for masks that are not prefix-causal (and
    for decoding against a dense KV cache, where T is 1).

    Args:
        q, k, v, q_rot, k_rot, eps: as in `structured_linear_attention`.
        mask: optional boolean `(B, T, S)` (or broadcastable), True = visible.

    Returns:
        `(B, T, N, D)` in `v.dtype`.
    """
    eps = validate_eps(eps)
    q, k, v = (ops.convert_to_tensor(x) for x in (q, k, v))
    _check(q, k, v, q_rot, k_rot)
    dtype = v.dtype
    heads_kv = k.shape[2]
    f32 = [None if x is None else ops.cast(x, "float32") for x in (q, k, v, q_rot, k_rot)]
    q, k, v, q_rot, k_rot = f32
    a_den = ops.einsum("btkgm,bskm->bkgts", _group(q, heads_kv), k)  # (B, K, G, T, S)
    a_num = a_den if q_rot is None else ops.einsum("btkgm,bskm->bkgts", _group(q_rot, heads_kv), k_rot)
    if mask is not None:
        mask = ops.cast(mask, "bool")
        keep = ops.expand_dims(ops.expand_dims(mask, 1), 1)  # (B, 1, 1, T, S)
        a_den = ops.where(keep, a_den, ops.zeros_like(a_den))
        a_num = ops.where(keep, a_num, ops.zeros_like(a_num))
        # keys no query sees may hold garbage (NaN): 0 * NaN is NaN
        seen = ops.any(mask, axis=1)  # (B or 1, S)
        seen = ops.reshape(seen, (ops.shape(seen)[0], ops.shape(seen)[1], 1, 1))
        v = ops.where(seen, v, ops.zeros_like(v))
    num = ops.einsum("bkgts,bskd->btkgd", a_num, v)  # (B, T, K, G, D)
    den = ops.expand_dims(ops.transpose(ops.sum(a_den, axis=-1), (0, 3, 1, 2)), -1)  # (B, T, K, G, 1)
    out = num / (den + eps)
    shape = ops.shape(out)
    return ops.cast(ops.reshape(out, (shape[0], shape[1], heads_kv * out.shape[3], out.shape[4])), dtype)


def split_prefix_causal_mask(mask):
    """Read a dense self-attention mask as prefix-causal: `(bidirectional_keys, causal_keys, exact)`.

    For a mask of the form `visible[t, s] = A[s] or (C[s] and s <= t)` (what
    keras-hub's decoder blocks build), `A` is the first query row (query 0
    sees the always-visible keys, and key 0 either way) and `C` the rest of
    the last row (the last query sees every visible key). `exact` is a
    boolean scalar tensor: whether the mask rebuilt from `A` and `C` equals
    `mask` everywhere, i.e. whether the linear path computes exactly what the
    mask asks. Cost O(B * T * S) boolean ops, the size of the mask itself.

    Args:
        mask: boolean (or 0/1) `(B, T, T)`.

    Returns:
        `(bidirectional_keys, causal_keys, exact)`: `(B, T)`, `(B, T)`, `()`.
    """
    mask = ops.cast(ops.convert_to_tensor(mask), "bool")
    if len(mask.shape) != 3:
        raise ValueError(
            f"`mask` must have shape (batch, T, T). Received: mask.shape={_shape_str(mask)}"
        )
    first, last = mask[:, 0, :], mask[:, -1, :]  # (B, T)
    causal = ops.logical_and(last, ops.logical_not(first))
    length = ops.shape(mask)[1]
    idx = ops.arange(length)
    tri = ops.expand_dims(idx, 1) >= ops.expand_dims(idx, 0)  # (T, T): s <= t
    rebuilt = ops.logical_or(
        ops.expand_dims(first, 1), ops.logical_and(ops.expand_dims(causal, 1), ops.expand_dims(tri, 0))
    )  # (B, T, T)
    exact = ops.all(ops.equal(rebuilt, mask))
    return first, causal, exact
