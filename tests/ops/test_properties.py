"""Property tests: every fast path against its naive reference on random shapes (every backend).

Hypothesis draws the shapes (lengths 1 to a few hundred, heads, feature and
value sizes), the feature map, the masks (all-masked rows included, with NaN
and inf written into the masked positions) and the schedule; each property
compares the fast kernel with `keras_sara.ops.naive` (or, for the softmax
branch, with `keras.layers.MultiHeadAttention` and a numpy softmax).

The example count per property is `SARA_PROPERTY_EXAMPLES` (default 12 on
TensorFlow and PyTorch, 4 on JAX, what `make test` runs); `make
test-properties` runs 300 on TensorFlow. Examples
are derandomised (the same cases on every run and machine) and nothing is
stored between runs, so a failure reproduces from the printed falsifying
example.
"""

import os
import warnings

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keras_sara import feature_maps
from keras_sara.layers import SARAMultiHeadAttention
from keras_sara.ops import kernels as la
from keras_sara.ops import naive
from keras_sara.ops import structured
from tests.backend_utils import backend, to_numpy, value_and_grads

# eager JAX compiles every op for every new shape (~30 s an example over these tests), so it draws fewer
EXAMPLES = int(os.environ.get("SARA_PROPERTY_EXAMPLES", "4" if backend() == "jax" else "12"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
FEATURE_MAPS = feature_maps.names()
GARBAGE = (np.nan, np.inf, -np.inf, 1e30)


def _close(got, want, scale, what, tol=1e-4):
    """float32 kernels against float32 references: `tol` relative to the output scale."""
    got, want = to_numpy(got).astype(np.float64), to_numpy(want).astype(np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} against {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite output"
    err = np.max(np.abs(got - want), initial=0.0)
    assert err <= tol * max(scale, 1e-3), f"{what}: max abs error {err:.3g} at scale {scale:.3g}"


@st.composite
def _key_mask(draw, batch, length, causal=False):
    """None, or a boolean (B, S) mask; one row may be fully masked.

    Causal kernels get left padding (the padded prefix of a batched prompt):
    the masked keys come first, so a query's row is empty until its first
    visible key.
    """
    kind = draw(st.sampled_from(["none", "random", "padding", "with_empty_row"]))
    if kind == "none":
        return None
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "random" and not causal:
        mask = rng.random((batch, length)) < draw(st.floats(0.2, 0.9))
    else:
        cut = rng.integers(0, length + 1, size=batch)
        pos = np.arange(length)[None]
        mask = pos >= cut[:, None] if causal else pos < (length - cut[:, None])
    if kind == "with_empty_row":
        mask[draw(st.integers(0, batch - 1))] = False
    return mask


def _with_garbage(x, key_mask, value):
    """`x` (B, S, ...) with `value` written into every masked position."""
    if key_mask is None:
        return x
    x = x.copy()
    x[~key_mask] = value
    return x


@st.composite
def _qkv(draw, causal=False, max_length=300, min_features=1):
    """Feature-mapped q (B, T, H, M), k (B, S, H, M), v (B, S, H, D) and a key mask."""
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, max_length))
    s = t if causal else draw(st.integers(1, max_length))
    h = draw(st.integers(1, 4))
    d_key = draw(st.integers(min_features, 16))
    d_value = draw(st.integers(1, 12))
    name = draw(st.sampled_from(FEATURE_MAPS))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    fmap = feature_maps.get(name)
    q = to_numpy(fmap(rng.normal(scale=scale, size=(b, t, h, d_key)).astype("float32"), role="query"))
    k = to_numpy(fmap(rng.normal(scale=scale, size=(b, s, h, d_key)).astype("float32"), role="key"))
    v = rng.normal(size=(b, s, h, d_value)).astype("float32")
    key_mask = draw(_key_mask(b, s, causal=causal))
    return dict(q=q, k=k, v=v, key_mask=key_mask, feature_map=name)


def _check_empty_rows_are_zero(out, key_mask, causal):
    """A query that sees no key outputs exactly 0."""
    if key_mask is None:
        return
    out = to_numpy(out)
    visible = np.cumsum(key_mask, axis=1) > 0 if causal else np.repeat(key_mask.any(1, keepdims=True), out.shape[1], 1)
    assert np.all(out[~visible] == 0.0), "a query with no visible key must give exactly 0"


# ----------------------------------------------------------------- kernels


@PROPERTY
@given(case=_qkv(), garbage=st.sampled_from(GARBAGE))
def test_bidirectional_kernel_matches_naive(case, garbage):
    q, k, v, key_mask = case["q"], case["k"], case["v"], case["key_mask"]
    want = naive.naive_linear_attention(q, k, v, key_mask=key_mask)
    got = la.linear_attention(q, _with_garbage(k, key_mask, garbage), _with_garbage(v, key_mask, garbage), key_mask=key_mask)
    _close(got, want, np.max(np.abs(v)), f"linear_attention [{case['feature_map']}]")
    _check_empty_rows_are_zero(got, key_mask, causal=False)


@PROPERTY
@given(
    case=_qkv(causal=True, max_length=160),
    schedule=st.sampled_from(la.CAUSAL_SCHEDULES),
    chunk_size=st.integers(1, 64),
    garbage=st.sampled_from(GARBAGE),
)
def test_causal_kernel_matches_naive(case, schedule, chunk_size, garbage):
    q, k, v, key_mask = case["q"], case["k"], case["v"], case["key_mask"]
    want = naive.naive_linear_attention(q, k, v, key_mask=key_mask, causal=True)
    got = la.causal_linear_attention(
        q, _with_garbage(k, key_mask, garbage), _with_garbage(v, key_mask, garbage),
        key_mask=key_mask, schedule=schedule, chunk_size=chunk_size,
    )
    _close(got, want, np.max(np.abs(v)), f"causal {schedule}/{chunk_size} [{case['feature_map']}]")
    _check_empty_rows_are_zero(got, key_mask, causal=True)


@PROPERTY
@given(case=_qkv(causal=True, max_length=48), garbage=st.sampled_from(GARBAGE))
def test_step_recurrence_matches_naive(case, garbage):
    q, k, v, key_mask = case["q"], case["k"], case["v"], case["key_mask"]
    want = to_numpy(naive.naive_linear_attention(q, k, v, key_mask=key_mask, causal=True))
    k_bad, v_bad = _with_garbage(k, key_mask, garbage), _with_garbage(v, key_mask, garbage)
    state = la.initial_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    rows = []
    for t in range(q.shape[1]):
        out_t, state = la.causal_linear_attention_step(
            q[:, t], k_bad[:, t], v_bad[:, t], state, key_mask_t=None if key_mask is None else key_mask[:, t]
        )
        rows.append(to_numpy(out_t))
    _close(np.stack(rows, axis=1), want, np.max(np.abs(v)), f"step [{case['feature_map']}]")
    assert all(np.all(np.isfinite(to_numpy(x))) for x in state), "garbage in a masked step reached the state"


@PROPERTY
@given(case=_qkv(max_length=200), causal=st.booleans(), query_masked=st.booleans())
def test_attention_weights_match_naive(case, causal, query_masked):
    q, k, key_mask = case["q"], case["k"], case["key_mask"]
    if causal:
        k = k[:, : q.shape[1]] if k.shape[1] >= q.shape[1] else np.pad(k, ((0, 0), (0, q.shape[1] - k.shape[1]), (0, 0), (0, 0)))
        key_mask = None
    query_mask = None
    if query_masked:
        query_mask = np.random.default_rng(q.shape[1]).random(q.shape[:2]) < 0.7
    want = naive.naive_linear_attention_weights(q, k, key_mask=key_mask, query_mask=query_mask, causal=causal)
    got = la.linear_attention_weights(q, k, key_mask=key_mask, query_mask=query_mask, causal=causal)
    _close(got, want, 1.0, "linear_attention_weights")


@PROPERTY
@given(case=_qkv(max_length=200), e=st.integers(1, 24), query_masked=st.booleans())
def test_projected_kernel_matches_naive(case, e, query_masked):
    q, k, v, key_mask = case["q"], case["k"], case["v"], case["key_mask"]
    h, d = v.shape[2], v.shape[3]
    rng = np.random.default_rng(e)
    kernel = rng.normal(size=(h, d, e)).astype("float32") / np.sqrt(h * d)
    query_mask = rng.random(q.shape[:2]) < 0.7 if query_masked else None
    want = np.einsum("bthd,hde->bte", to_numpy(naive.naive_linear_attention(q, k, v, key_mask=key_mask)), kernel)
    if query_mask is not None:
        want = want * query_mask[..., None]
    got = la.linear_attention_projected(q, k, v, kernel, key_mask=key_mask, query_mask=query_mask)
    _close(got, want, np.max(np.abs(want), initial=0.0) + np.max(np.abs(v)), "linear_attention_projected")


@PROPERTY
@given(case=_qkv(max_length=120), e=st.integers(1, 24))
def test_split_heads_kernel_matches_naive(case, e):
    q, k, v = case["q"], case["k"], case["v"]
    h, d = v.shape[2], v.shape[3]
    kernel = np.random.default_rng(e).normal(size=(h, d, e)).astype("float32") / np.sqrt(h * d)
    want = np.einsum("bthd,hde->bte", to_numpy(naive.naive_linear_attention(q, k, v)), kernel)
    got = la.linear_attention_split_heads(
        [q[:, :, i] for i in range(h)], [k[:, :, i] for i in range(h)], [v[:, :, i] for i in range(h)], kernel
    )
    _close(got, want, np.max(np.abs(want), initial=0.0) + np.max(np.abs(v)), "linear_attention_split_heads")


@st.composite
def _grouped(draw):
    """Grouped-query inputs (N query heads, K key/value heads) and prefix/causal key sets."""
    b = draw(st.integers(1, 2))
    t = draw(st.integers(1, 96))
    heads_kv = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    m, d = draw(st.integers(1, 12)), draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    name = draw(st.sampled_from(FEATURE_MAPS))  # one map per side: learnable maps are per head
    q = to_numpy(feature_maps.get(name)(rng.normal(size=(b, t, heads_kv * groups, m)).astype("float32"), role="query"))
    k = to_numpy(feature_maps.get(name)(rng.normal(size=(b, t, heads_kv, m)).astype("float32"), role="key"))
    v = rng.normal(size=(b, t, heads_kv, d)).astype("float32")
    kind = draw(st.sampled_from(["none", "padding", "causal", "prefix_lm"]))
    bidirectional = causal = None
    if kind == "padding":
        bidirectional = rng.random((b, t)) < 0.7
    elif kind == "causal":
        causal = np.arange(t)[None] >= rng.integers(0, t + 1, size=(b, 1))  # left padding
    elif kind == "prefix_lm":  # image + prompt seen by all, then causal text (PaliGemma)
        prefix = rng.integers(0, t + 1, size=(b, 1))
        bidirectional = np.arange(t)[None] < prefix
        causal = ~bidirectional
    rotary = draw(st.booleans())
    q_rot = k_rot = None
    if rotary:  # a rotated numerator, signed as RoPE makes it
        q_rot = (q * rng.choice([-1.0, 1.0], size=q.shape)).astype("float32")
        k_rot = (k * rng.choice([-1.0, 1.0], size=k.shape)).astype("float32")
    return dict(q=q, k=k, v=v, bidirectional=bidirectional, causal=causal, q_rot=q_rot, k_rot=k_rot)


def _dense_visibility(case):
    b, t = case["q"].shape[:2]
    s = case["k"].shape[1]
    if case["bidirectional"] is None and case["causal"] is None:
        return None
    mask = np.zeros((b, t, s), bool)
    if case["bidirectional"] is not None:
        mask |= case["bidirectional"][:, None, :]
    if case["causal"] is not None:
        mask |= case["causal"][:, None, :] & np.tril(np.ones((t, s), bool))[None]
    return mask


@PROPERTY
@given(case=_grouped(), chunk_size=st.integers(1, 40))
def test_structured_kernel_matches_naive(case, chunk_size):
    want = naive.naive_structured_linear_attention(
        case["q"], case["k"], case["v"], mask=_dense_visibility(case), q_rot=case["q_rot"], k_rot=case["k_rot"]
    )
    got = structured.structured_linear_attention(
        case["q"], case["k"], case["v"], bidirectional_keys=case["bidirectional"], causal_keys=case["causal"],
        q_rot=case["q_rot"], k_rot=case["k_rot"], chunk_size=chunk_size,
    )
    _close(got, want, np.max(np.abs(to_numpy(want)), initial=0.0) + np.max(np.abs(case["v"])), "structured")


@PROPERTY
@given(
    # one feature: out_t = q Psi / (q Gamma + eps) hardly depends on q, and d/dq is the
    # float32 cancellation of two terms thousands of times larger than their difference
    case=_qkv(causal=True, max_length=40, min_features=2),
    causal=st.booleans(),
    schedule=st.sampled_from(la.CAUSAL_SCHEDULES),
)
def test_kernel_gradients_match_naive(case, causal, schedule):
    q, k, v, key_mask = case["q"], case["k"], case["v"], case["key_mask"]

    def fast(q_, k_, v_):
        if causal:
            return la.causal_linear_attention(q_, k_, v_, key_mask=key_mask, schedule=schedule, chunk_size=7)
        return la.linear_attention(q_, k_, v_, key_mask=key_mask)

    def reference(q_, k_, v_):
        return naive.naive_linear_attention(q_, k_, v_, key_mask=key_mask, causal=causal)

    cot = np.random.default_rng(1).normal(size=q.shape[:3] + v.shape[3:]).astype("float32")
    jit = backend() == "jax" and not causal  # the naive causal loop compiles slowly once unrolled
    out_f, grads_f = value_and_grads(fast, [q, k, v], cot, jit=jit)
    out_r, grads_r = value_and_grads(reference, [q, k, v], cot, jit=jit)
    _close(out_f, out_r, np.max(np.abs(v)), "outputs")
    for name, gf, gr in zip("qkv", grads_f, grads_r):
        # d/dq = k.(v - out) / (q.Gamma + eps) is a difference of terms of the size of v: with one or
        # two visible keys, or near-equal values, it nearly cancels, so the scale includes max |v|
        scale = np.max(np.abs(gr), initial=0.0) + np.max(np.abs(v))
        _close(gf, gr, scale, f"d/d{name} ({'causal ' + schedule if causal else 'bidirectional'})", tol=1e-3)


# ------------------------------------------------------------------ layer


@st.composite
def _layer_case(draw):
    b = draw(st.integers(1, 2))
    t = draw(st.integers(1, 64))
    causal = draw(st.booleans())
    s = t if causal else draw(st.integers(1, 64))
    return dict(
        b=b, t=t, s=s, causal=causal,
        heads=draw(st.integers(1, 4)),
        key_dim=draw(st.integers(1, 12)),
        embed=draw(st.integers(1, 24)),
        feature_map=draw(st.sampled_from(FEATURE_MAPS)),
        masked=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _inputs(case):
    rng = np.random.default_rng(case["seed"])
    query = rng.normal(size=(case["b"], case["t"], case["embed"])).astype("float32")
    value = query if case["causal"] else rng.normal(size=(case["b"], case["s"], case["embed"])).astype("float32")
    mask = None
    if case["masked"]:
        mask = np.arange(case["s"])[None] < rng.integers(1, case["s"] + 1, size=(case["b"], 1))  # right padding, >= 1 key
    return query, value, mask


def _numpy_softmax_attention(layer, query, value, mask, causal):
    """Softmax attention recomputed in numpy from the layer's own projections."""
    q = to_numpy(layer.query_dense(query)).astype(np.float64)  # (B, T, H, d)
    k = to_numpy(layer.key_dense(value)).astype(np.float64)
    v = to_numpy(layer.value_dense(value)).astype(np.float64)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    visible = np.ones(logits.shape, bool)
    if mask is not None:
        visible &= mask[:, None, None, :]
    if causal:
        visible &= np.tril(np.ones(logits.shape[-2:], bool))[None, None]
    logits = np.where(visible, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", weights, v).astype("float32")
    return to_numpy(layer.output_dense(out))


@PROPERTY
@given(case=_layer_case())
def test_blend_zero_equals_keras_mha_and_a_numpy_softmax(case):
    """The softmax branch is Keras' MHA, causal mask included (keras #23038 broke Keras' causal mask in 2026)."""
    query, value, mask = _inputs(case)
    mha = keras.layers.MultiHeadAttention(case["heads"], case["key_dim"], seed=1)
    mha(query, value)
    sara = SARAMultiHeadAttention(case["heads"], case["key_dim"], seed=1, blend=0.0, feature_map=case["feature_map"])
    sara(query, value)
    n = len(mha.get_weights())
    sara.set_weights(mha.get_weights() + sara.get_weights()[n:])
    kwargs = dict(value_mask=mask) if mask is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = to_numpy(sara(query, value, use_causal_mask=case["causal"], **kwargs))
    keras_out = to_numpy(mha(query, value, use_causal_mask=case["causal"], **kwargs))
    numpy_out = _numpy_softmax_attention(mha, query, value, mask, case["causal"])
    scale = np.max(np.abs(numpy_out), initial=0.0) + 1.0
    _close(keras_out, numpy_out, scale, "keras.layers.MultiHeadAttention against numpy softmax")
    _close(got, numpy_out, scale, "SARA blend=0 against numpy softmax")


@PROPERTY
@given(case=_layer_case(), schedule=st.sampled_from(la.CAUSAL_SCHEDULES))
def test_linear_layer_matches_naive(case, schedule):
    query, value, mask = _inputs(case)
    layer = SARAMultiHeadAttention(
        case["heads"], case["key_dim"], seed=1, feature_map=case["feature_map"], causal_schedule=schedule, chunk_size=5
    )
    kwargs = dict(value_mask=mask) if mask is not None else {}
    got = to_numpy(layer(query, value, use_causal_mask=case["causal"], **kwargs))
    qf = layer.feature_map(layer.query_dense(query), role="query")
    kf = layer.feature_map(layer.key_dense(value), role="key")
    v = layer.value_dense(value)
    out = naive.naive_linear_attention(qf, kf, v, key_mask=mask, causal=case["causal"], eps=layer.eps)
    want = to_numpy(layer.output_dense(out))
    _close(got, want, np.max(np.abs(want), initial=0.0) + 1.0, f"SARAMultiHeadAttention [{case['feature_map']}]")
