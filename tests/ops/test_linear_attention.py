"""Every linear-attention schedule against the naive quadratic reference.

Outputs and gradients (w.r.t. q, k and v) of the bidirectional kernel, the two
causal schedules and the recurrent step are compared with
`keras_sara.ops.naive`, over lengths that are not multiples of the chunk sizes,
with and without key masks (one batch element fully masked).

The references check each other and share no code with the kernels:
`naive_linear_attention` (a Python loop over time when causal) is checked
against a float64 numpy computation of the factored sums, and against the
naive masked matrix `naive_linear_attention_weights(...) @ v`. Up to
`LOOP_MAX_T` tokens the causal schedules are compared with the loop, beyond it
with the masked matrix: differentiating a 500-step Python loop takes from
seconds (eager TensorFlow) to minutes (JAX). The recurrent step is a token loop
too: gradients up to `LOOP_MAX_T`, outputs and state at every length.

`test_causal_left_padding` guards a fixed bug: the chunked schedule once took
the state carried into a chunk as `cumsum - own`, whose gradient cancels
catastrophically when a chunk holds queries with no visible key (their
d out / d num is 1 / eps).
"""

import functools

import numpy as np
import pytest
from keras import ops

from keras_sara.ops import (
    causal_linear_attention,
    causal_linear_attention_step,
    initial_state,
    linear_attention,
    linear_attention_weights,
)
from keras_sara.ops.naive import naive_linear_attention, naive_linear_attention_weights
from tests.backend_utils import rel_err, to_numpy, value_and_grads

B, H, M, D = 2, 2, 8, 8
LENGTHS = [1, 7, 63, 500]
LOOP_MAX_T = 63  # longest sequence differentiated through a Python time loop
TOL = 1e-5  # relative error, float32
EPS = 1e-6

# Chunk sizes that divide none of LENGTHS.
CAUSAL_SCHEDULES = ("parallel", "chunked4", "chunked16", "chunked64")
CAUSAL = {"step", "naive_causal", "matrix_causal", *CAUSAL_SCHEDULES}
TIME_LOOPS = {"step", "naive_causal"}  # Python loops over time: never jit-compiled


# ----------------------------------------------------------------------------
# Inputs and an independent float64 reference
# ----------------------------------------------------------------------------


def positive(rng, shape):
    """exp(small randn) features: positive and well away from zero.

    Every denominator is then O(M), so float32 gradients are well conditioned
    and a 1e-5 relative tolerance measures the kernels, not the data.
    `relu_features` covers the paper's ReLU map, with near-zero denominators.
    """
    return np.exp(0.5 * rng.standard_normal(shape)).astype("float32")


def relu_features(rng, shape):
    """ReLU features with the Performer stabiliser: many entries are 1e-3."""
    return (np.maximum(rng.standard_normal(shape), 0.0) + 1e-3).astype("float32")


def make_inputs(t, s, masked, seed=0, features=positive):
    """q, k, v, key_mask (or None) and an output cotangent, fixed by the arguments.

    The mask pads batch 1 completely and batch 0 at random, but never its first
    key (leading padding has its own test, `test_causal_left_padding`).
    """
    rng = np.random.default_rng([seed, t, s, int(masked)])
    q = features(rng, (B, t, H, M))
    k = features(rng, (B, s, H, M))
    v = rng.standard_normal((B, s, H, D)).astype("float32")
    cot = rng.standard_normal((B, t, H, D)).astype("float32")
    mask = None
    if masked:
        mask = rng.random((B, s)) < 0.7
        mask[0, 0] = mask[0, -1] = True
        mask[1] = False  # batch 1: every key padded
    return q, k, v, mask, cot


def numpy_attention(q, k, v, key_mask=None, causal=False, eps=EPS):
    """float64 factored form: out_t = q_t [Psi_t | Gamma_t] with (prefix) sums.

    Returns the output `(B, T, H, D)` and the normaliser `(B, T, H)`.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    if key_mask is not None:
        keep = np.asarray(key_mask, bool)[:, :, None, None]  # (B, S, 1, 1)
        k = np.where(keep, k, 0.0)
        v = np.where(keep, v, 0.0)
    v1 = np.concatenate([v, np.ones_like(v[..., :1])], axis=-1)  # (B, S, H, D+1)
    kv = k[..., :, None] * v1[..., None, :]  # (B, S, H, M, D+1)
    kv = np.cumsum(kv, axis=1) if causal else kv.sum(axis=1, keepdims=True)
    out = np.sum(q[..., :, None] * kv, axis=-2)  # (B, T, H, D+1)
    return out[..., :-1] / (out[..., -1:] + eps), out[..., -1]


def numpy_state(k, v, key_mask=None):
    """float64 (psi, gamma) after all unmasked keys: (B, H, M, D), (B, H, M)."""
    k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
    if key_mask is not None:
        keep = np.asarray(key_mask, bool)[:, :, None, None]
        k, v = np.where(keep, k, 0.0), np.where(keep, v, 0.0)
    return np.einsum("bshm,bshd->bhmd", k, v), k.sum(axis=1)


def tensor(x):
    return None if x is None else ops.convert_to_tensor(x)


# ----------------------------------------------------------------------------
# Schedules and references as fn(q, k, v) closures, and their gradients
# ----------------------------------------------------------------------------


def step_loop(q, k, v, mask=None, return_state=False):
    """Feeds the sequence through `causal_linear_attention_step` token by token."""
    state = initial_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    mask = tensor(mask)
    outs = []
    for t in range(q.shape[1]):
        # `take`, not x[:, t]: one gather shape for every t (JAX compiles once)
        q_t, k_t, v_t = (ops.take(x, t, axis=1) for x in (q, k, v))  # (B, H, F)
        mask_t = None if mask is None else ops.take(mask, t, axis=1)  # (B,)
        out_t, state = causal_linear_attention_step(q_t, k_t, v_t, state, key_mask_t=mask_t)
        outs.append(out_t)  # (B, H, D)
    out = ops.stack(outs, axis=1)  # (B, T, H, D)
    return (out, state) if return_state else out


def attention_fn(variant, mask=None):
    """fn(q, k, v) -> (B, T, H, D) for one schedule or reference.

    Variants: "bidirectional", "parallel", "chunked<C>" (chunk size C, 16 if
    left out), "step", "naive", "naive_causal", and "matrix"/"matrix_causal":
    the naive normalised (B, H, T, S) matrix applied to v, with no time loop.
    """
    key_mask = tensor(mask)
    causal = variant in CAUSAL or variant.startswith("chunked")

    def fn(q, k, v):
        if variant == "bidirectional":
            return linear_attention(q, k, v, key_mask=key_mask)
        if variant == "parallel":
            return causal_linear_attention(q, k, v, key_mask=key_mask, schedule="parallel")
        if variant.startswith("chunked"):
            chunk_size = int(variant[len("chunked"):] or 16)
            return causal_linear_attention(
                q, k, v, key_mask=key_mask, schedule="chunked", chunk_size=chunk_size
            )
        if variant == "step":
            return step_loop(q, k, v, key_mask)
        if variant.startswith("naive"):
            return naive_linear_attention(q, k, v, key_mask=key_mask, causal=causal)
        w = naive_linear_attention_weights(q, k, key_mask=key_mask, causal=causal)
        return ops.einsum("bhts,bshd->bthd", w, ops.cast(v, "float32"))  # (B, T, H, D)

    fn.time_loop = variant in TIME_LOOPS
    return fn


def multi_grads(fns, input_sets, cot):
    """[(output, [dq, dk, dv]), ...] of several fn(q, k, v), in a single vjp.

    Each fn gets its own copy of its inputs, so the gradients stay apart. On
    JAX the set then compiles as one program: compiling, not computing, is
    most of the cost of these small tests there.
    """
    n = len(fns)

    def stacked(*xs):
        return ops.stack([f(*xs[3 * i : 3 * i + 3]) for i, f in enumerate(fns)])  # (n, B, T, H, D)

    flat = [x for inputs in input_sets for x in inputs]
    jit = not any(f.time_loop for f in fns)
    out, grads = value_and_grads(stacked, flat, np.stack([cot] * n), jit=jit)
    return [(out[i], grads[3 * i : 3 * i + 3]) for i in range(n)]


def grads_of(variant, q, k, v, mask, cot):
    return multi_grads([attention_fn(variant, mask)], [(q, k, v)], cot)[0]


@functools.lru_cache(maxsize=None)
def results(variants, t, s, masked):
    """{variant: (output, grads)} on `make_inputs(t, s, masked)`, cached."""
    q, k, v, mask, cot = make_inputs(t, s, masked)
    fns = [attention_fn(variant, mask) for variant in variants]
    return dict(zip(variants, multi_grads(fns, [(q, k, v)] * len(fns), cot)))


def naive_result(t, s, masked, causal):
    if not causal:
        variant = "naive"
    else:
        variant = "naive_causal" if t <= LOOP_MAX_T else "matrix_causal"
    return results((variant,), t, s, masked)[variant]


def assert_close(result, reference, one_key_per_row=False, tol=TOL):
    """Outputs and the q, k, v gradients within `tol` relative error."""
    (out, grads), (ref_out, ref_grads) = result, reference
    assert out.shape == ref_out.shape
    assert rel_err(out, ref_out) <= tol, rel_err(out, ref_out)
    # With one visible key per row, out_t = v_s * a / (a + eps): the q and k
    # gradients are O(eps) and both sides hold only rounding noise there.
    scale = np.linalg.norm(ref_grads[2])
    for name, g, ref in zip("qkv", grads, ref_grads):
        if name in "qk" and one_key_per_row:
            assert np.linalg.norm(g) <= tol * scale and np.linalg.norm(ref) <= tol * scale
        else:
            assert rel_err(g, ref) <= tol, (name, rel_err(g, ref))


# ----------------------------------------------------------------------------
# The references themselves
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize(
    "t,causal",
    [(t, False) for t in LENGTHS] + [(t, True) for t in LENGTHS if t <= LOOP_MAX_T],
)
def test_naive_matches_numpy(t, causal, masked):
    q, k, v, mask, _ = make_inputs(t, t, masked)
    out = naive_linear_attention(q, k, v, key_mask=mask, causal=causal)
    assert ops.dtype(out) == "float32"
    assert rel_err(out, numpy_attention(q, k, v, mask, causal)[0]) <= TOL


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_naive_causal_loop_matches_naive_matrix(masked):
    """Gradients too: the masked matrix stands in for the loop beyond LOOP_MAX_T."""
    t = LOOP_MAX_T
    loop = results(("naive_causal",), t, t, masked)["naive_causal"]
    assert_close(loop, results(("matrix_causal",), t, t, masked)["matrix_causal"])


def test_naive_causal_ignores_future_keys():
    q, k, v, _, _ = make_inputs(7, 7, False)
    k2, v2 = k.copy(), v.copy()
    k2[:, 4:] *= 3.0
    v2[:, 4:] = -v2[:, 4:]
    a = to_numpy(naive_linear_attention(q, k, v, causal=True))
    b = to_numpy(naive_linear_attention(q, k2, v2, causal=True))
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert not np.allclose(a[:, 4:], b[:, 4:])


# ----------------------------------------------------------------------------
# Each schedule against the naive reference: outputs and gradients
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize(
    "t,s", [(1, 1), (7, 7), (63, 63), (500, 500), (7, 63), (63, 7), (1, 500), (500, 1)]
)
def test_bidirectional_matches_naive(t, s, masked):
    res = results(("naive", "bidirectional"), t, s, masked)
    assert_close(res["bidirectional"], res["naive"], one_key_per_row=s == 1)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("schedule", CAUSAL_SCHEDULES)
def test_causal_matches_naive(schedule, t, masked):
    res = results(CAUSAL_SCHEDULES, t, t, masked)[schedule]
    assert_close(res, naive_result(t, t, masked, causal=True), one_key_per_row=t == 1)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("t", [t for t in LENGTHS if t <= LOOP_MAX_T])
def test_step_matches_naive(t, masked):
    res = results(("step",), t, t, masked)["step"]
    assert_close(res, naive_result(t, t, masked, causal=True), one_key_per_row=t == 1)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("t", LENGTHS)
def test_causal_schedules_agree(t, masked):
    res = dict(results(CAUSAL_SCHEDULES, t, t, masked))
    if t <= LOOP_MAX_T:
        res.update(results(("step",), t, t, masked))
    ref = res.pop("parallel")
    for other in res.values():
        assert_close(other, ref, one_key_per_row=t == 1)


LEFT_PADDING_SCHEDULES = ("parallel", "chunked4", "chunked16", "chunked64")


@functools.lru_cache(maxsize=None)
def left_padding_results(variants):
    """Keys 0-2 padded in both batch elements (and 20-24 in batch 1), t = 40."""
    t, pad = 40, 3
    q, k, v, _, cot = make_inputs(t, t, False, seed=2)
    mask = np.ones((B, t), bool)
    mask[:, :pad] = False
    mask[1, 20:25] = False
    fns = [attention_fn(variant, mask) for variant in variants]
    return dict(zip(variants, multi_grads(fns, [(q, k, v)] * len(fns), cot))), pad


@pytest.mark.parametrize(
    "schedule",
    [
        "parallel",
        "chunked4",
        "chunked16",
        "chunked64",  # one chunk: nothing is carried, nothing cancels
        "step",
    ],
)
def test_causal_left_padding(schedule):
    """Leading padded keys: the first rows see nothing and must not spoil the rest."""
    res, pad = left_padding_results(LEFT_PADDING_SCHEDULES + ("matrix_causal",))
    if schedule == "step":
        res = {**res, **left_padding_results(("step",))[0]}
    out, ref = res[schedule], res["matrix_causal"]
    np.testing.assert_array_equal(out[0][:, :pad], 0.0)
    np.testing.assert_array_equal(ref[0][:, :pad], 0.0)
    assert_close(out, ref)


@pytest.mark.parametrize("variant", ["bidirectional", "parallel", "chunked16", "step"])
def test_relu_features_match_naive(variant):
    """The paper's ReLU(x) + 1e-3 features: some denominators are tiny.

    The factored kernels sum per-row gradient terms scaled by 1 / denominator
    before contracting them, so float32 rounding grows with the largest of
    those terms: gradients get 1e-4 here. (No leading padding: see
    `test_causal_left_padding` for the chunked schedule.)
    """
    t = LOOP_MAX_T if variant == "step" else 500
    q, k, v, mask, cot = make_inputs(t, t, True, seed=3, features=relu_features)
    reference = "matrix_causal" if variant in CAUSAL else "matrix"
    res, ref = multi_grads(
        [attention_fn(variant, mask), attention_fn(reference, mask)], [(q, k, v)] * 2, cot
    )
    assert rel_err(res[0], ref[0]) <= TOL
    for g, r in zip(res[1], ref[1]):
        assert rel_err(g, r) <= 1e-4


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("t", LENGTHS)
def test_step_outputs_and_state_match_numpy(t, masked):
    q, k, v, mask, _ = make_inputs(t, t, masked)
    out, (psi, gamma) = step_loop(*(tensor(x) for x in (q, k, v)), mask, return_state=True)
    assert ops.dtype(psi) == "float32" and ops.dtype(gamma) == "float32"
    ref_psi, ref_gamma = numpy_state(k, v, mask)
    assert rel_err(out, numpy_attention(q, k, v, mask, causal=True)[0]) <= TOL
    assert rel_err(psi, ref_psi) <= TOL
    assert rel_err(gamma, ref_gamma) <= TOL


def test_step_padded_token_leaves_state_unchanged():
    q, k, v, _, _ = make_inputs(1, 1, False)
    state = initial_state(B, H, M, D)
    _, state = causal_linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state)
    keep = np.array([False, True])
    _, new = causal_linear_attention_step(q[:, 0], 2 * k[:, 0], v[:, 0], state, key_mask_t=keep)
    for old, upd in zip(state, new):
        np.testing.assert_array_equal(to_numpy(upd)[0], to_numpy(old)[0])
        assert not np.allclose(to_numpy(upd)[1], to_numpy(old)[1])


def test_causal_differs_from_bidirectional():
    q, k, v, _, _ = make_inputs(7, 7, False)
    assert rel_err(causal_linear_attention(q, k, v), linear_attention(q, k, v)) > 1e-2


# ----------------------------------------------------------------------------
# Attention weights
# ----------------------------------------------------------------------------

WEIGHT_CASES = [
    # (t, s, key mask, query mask, causal)
    (7, 7, False, False, False),
    (7, 63, True, False, False),
    (63, 7, True, True, False),
    (1, 500, True, False, False),
    (63, 63, False, False, True),
    (63, 63, True, True, True),
]


@pytest.mark.parametrize("t,s,masked,query_masked,causal", WEIGHT_CASES)
def test_weights_match_naive(t, s, masked, query_masked, causal):
    q, k, _, mask, _ = make_inputs(t, s, masked)
    query_mask = None
    if query_masked:
        query_mask = np.random.default_rng(t).random((B, t)) < 0.7
    kwargs = dict(key_mask=tensor(mask), query_mask=tensor(query_mask), causal=causal)
    w = linear_attention_weights(tensor(q), tensor(k), **kwargs)
    ref = naive_linear_attention_weights(tensor(q), tensor(k), **kwargs)
    assert tuple(w.shape) == (B, H, t, s)
    assert ops.dtype(w) == "float32"
    assert rel_err(w, ref) <= TOL
    if query_mask is not None:
        rows = np.transpose(to_numpy(w), (0, 2, 1, 3))[~query_mask]  # (n, H, S)
        np.testing.assert_array_equal(rows, 0.0)


@pytest.mark.parametrize(
    "t,s,masked,causal", [(7, 63, True, False), (63, 63, True, True), (500, 500, False, True)]
)
def test_weights_applied_to_values_give_output(t, s, masked, causal):
    q, k, v, mask, _ = make_inputs(t, s, masked)
    w = linear_attention_weights(tensor(q), tensor(k), key_mask=tensor(mask), causal=causal)
    applied = np.einsum("bhts,bshd->bthd", to_numpy(w), v)  # (B, T, H, D)
    out = attention_fn("parallel" if causal else "bidirectional", mask)(q, k, v)
    assert rel_err(applied, out) <= TOL


# ----------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------

ALL_VARIANTS = ["bidirectional", "parallel", "chunked16", "step"]


# Rounding the output alone gives about 2e-4 (float16) and 1.6e-3 (bfloat16).
# Summing in the input dtype instead overflows float16 (the numerators reach
# ~1e5 here) and gives about 5.5e-3 for sequential bfloat16 prefix sums.
@pytest.mark.parametrize("dtype,tol", [("float16", 1e-3), ("bfloat16", 4e-3)])
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_low_precision_accumulates_in_float32(variant, dtype, tol):
    t = 100
    q, k, v, mask, _ = make_inputs(t, t, True)
    q, k, v = 4.0 * q, 4.0 * k, 100.0 * v
    low = [ops.cast(tensor(x), dtype) for x in (q, k, v)]
    out = attention_fn(variant, mask)(*low)
    assert ops.dtype(out) == dtype
    # the reference sees exactly the rounded inputs, so only the output rounding differs
    low32 = [ops.cast(x, "float32") for x in low]
    ref = attention_fn("matrix_causal" if variant in CAUSAL else "matrix", mask)(*low32)
    assert rel_err(ops.cast(out, "float32"), ref) <= tol


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_zero_features_give_exact_zeros(variant):
    t = 20
    _, _, v, _, cot = make_inputs(t, t, False)
    zeros = np.zeros((B, t, H, M), "float32")
    out, grads = grads_of(variant, zeros, zeros, v, None, cot)
    np.testing.assert_array_equal(out, 0.0)
    for g in grads:
        assert np.all(np.isfinite(g))
    w = linear_attention_weights(tensor(zeros), tensor(zeros), causal=variant in CAUSAL)
    np.testing.assert_array_equal(to_numpy(w), 0.0)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_rows_without_visible_keys_are_zero(variant):
    t, pad = 63, 5
    q, k, v, _, _ = make_inputs(t, t, False)
    mask = np.ones((B, t), bool)
    mask[0] = False  # batch 0: nothing to attend to
    mask[1, :pad] = False  # batch 1: left padding
    out = to_numpy(attention_fn(variant, mask)(*(tensor(x) for x in (q, k, v))))
    np.testing.assert_array_equal(out[0], 0.0)
    if variant == "bidirectional":
        assert np.all(np.abs(out[1]).sum(axis=-1) > 0)
    else:
        np.testing.assert_array_equal(out[1, :pad], 0.0)  # causal rows before the first key
        assert np.all(np.abs(out[1, pad:]).sum(axis=-1) > 0)
    ref = numpy_attention(q, k, v, mask, causal=variant in CAUSAL)[0]
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("variant", ALL_VARIANTS + ["naive", "naive_causal"])
def test_garbage_in_masked_positions_does_not_leak(variant):
    t = 20
    q, k, v, mask, cot = make_inputs(t, t, True)
    dirty_k, dirty_v = k.copy(), v.copy()
    padded = np.argwhere(~mask)  # (n, 2) batch, position
    for i, (b, s) in enumerate(padded):
        dirty_k[b, s] = (np.nan, np.inf, -np.inf)[i % 3]
        dirty_v[b, s] = (np.inf, -np.inf, np.nan)[i % 3]
    fn = attention_fn(variant, mask)
    clean, dirty = multi_grads([fn, fn], [(q, k, v), (q, dirty_k, dirty_v)], cot)
    assert np.all(np.isfinite(dirty[0]))
    assert rel_err(dirty[0], clean[0]) <= 1e-6
    for g, ref in zip(dirty[1], clean[1]):
        assert np.all(np.isfinite(g))
        assert rel_err(g, ref) <= 1e-6
    for weights in (linear_attention_weights, naive_linear_attention_weights):
        w = weights(tensor(q), tensor(dirty_k), key_mask=tensor(mask), causal=variant in CAUSAL)
        assert np.all(np.isfinite(to_numpy(w)))


@pytest.mark.parametrize("variant", ["bidirectional", "parallel", "chunked"])
def test_long_float16_sequence_is_finite_and_accurate(variant):
    t, m, d = 65_536, 16, 16
    rng = np.random.default_rng(65_536)
    q = relu_features(rng, (1, t, 1, m)).astype("float16")
    k = relu_features(rng, (1, t, 1, m)).astype("float16")
    v = rng.standard_normal((1, t, 1, d)).astype("float16")
    causal = variant != "bidirectional"
    ref, den = numpy_attention(q, k, v, causal=causal)
    # the normaliser overflows float16 (max 65504): accumulating in it would fail
    assert den.max() > 1e5
    if causal:
        out = causal_linear_attention(q, k, v, schedule=variant)
    else:
        out = linear_attention(q, k, v)
    assert ops.dtype(out) == "float16"
    out = to_numpy(ops.cast(out, "float32"))
    assert np.all(np.isfinite(out))
    assert rel_err(out, ref) <= 2e-3


# ----------------------------------------------------------------------------
# Input validation: ValueError naming the argument and the received value
# ----------------------------------------------------------------------------


def ones(*shape, dtype="float32"):
    return np.ones(shape, dtype)


Q, K, V = ones(2, 7, 2, 8), ones(2, 7, 2, 8), ones(2, 7, 2, 4)

# (id, call, fragments the message must contain)
BAD_INPUTS = [
    ("q_rank", lambda: linear_attention(ones(2, 7, 8), K, V), ["`q`", "q.shape=(2, 7, 8)"]),
    (
        "k_rank",
        lambda: causal_linear_attention(Q, ones(2, 7, 2, 8, 1), V),
        ["`k`", "k.shape=(2, 7, 2, 8, 1)"],
    ),
    ("v_rank", lambda: linear_attention(Q, K, ones(7, 2, 4)), ["`v`", "v.shape=(7, 2, 4)"]),
    (
        "kv_length",
        lambda: linear_attention(Q, K, ones(2, 6, 2, 4)),
        ["k.shape=(2, 7, 2, 8)", "v.shape=(2, 6, 2, 4)"],
    ),
    (
        "heads_q",
        lambda: linear_attention(ones(2, 7, 3, 8), K, V),
        ["heads", "q.shape=(2, 7, 3, 8)"],
    ),
    (
        "heads_v",
        lambda: causal_linear_attention(Q, K, ones(2, 7, 1, 4)),
        ["heads", "v.shape=(2, 7, 1, 4)"],
    ),
    (
        "feature_size",
        lambda: linear_attention(ones(2, 7, 2, 5), K, V),
        ["q.shape=(2, 7, 2, 5)", "k.shape=(2, 7, 2, 8)"],
    ),
    ("eps_zero", lambda: linear_attention(Q, K, V, eps=0), ["`eps`", "eps=0"]),
    ("eps_negative", lambda: causal_linear_attention(Q, K, V, eps=-1), ["`eps`", "eps=-1"]),
    ("eps_bool", lambda: linear_attention(Q, K, V, eps=True), ["`eps`", "eps=True"]),
    (
        "eps_step",
        lambda: causal_linear_attention_step(
            Q[:, 0], K[:, 0], V[:, 0], initial_state(2, 2, 8, 4), eps=0
        ),
        ["`eps`", "eps=0"],
    ),
    ("eps_weights", lambda: linear_attention_weights(Q, K, eps=-1e-3), ["`eps`", "eps=-0.001"]),
    (
        "chunk_size_zero",
        lambda: causal_linear_attention(Q, K, V, schedule="chunked", chunk_size=0),
        ["`chunk_size`", "chunk_size=0"],
    ),
    (
        "chunk_size_negative",
        lambda: causal_linear_attention(Q, K, V, schedule="chunked", chunk_size=-4),
        ["`chunk_size`", "chunk_size=-4"],
    ),
    (
        "schedule",
        lambda: causal_linear_attention(Q, K, V, schedule="fast"),
        ["`schedule`", "schedule='fast'"],
    ),
    (
        "causal_t_ne_s",
        lambda: causal_linear_attention(ones(2, 5, 2, 8), K, V),
        ["q.shape=(2, 5, 2, 8)", "k.shape=(2, 7, 2, 8)"],
    ),
    (
        "key_mask_length",
        lambda: linear_attention(Q, K, V, key_mask=ones(2, 6, dtype=bool)),
        ["`key_mask`", "key_mask.shape=(2, 6)"],
    ),
    (
        "key_mask_rank",
        lambda: causal_linear_attention(Q, K, V, key_mask=ones(7, dtype=bool)),
        ["`key_mask`", "key_mask.shape=(7,)"],
    ),
]


@pytest.mark.parametrize(
    "call,fragments", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_raises_value_error(call, fragments):
    with pytest.raises(ValueError, match="Received: ") as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_more_bad_inputs_name_the_argument():
    q, k, v, _, _ = make_inputs(5, 5, False)
    with pytest.raises(ValueError, match="batch size"):
        linear_attention(q[:1], k, v)
    with pytest.raises(ValueError, match="as many queries as keys"):
        linear_attention_weights(q[:, :3], k, causal=True)
    with pytest.raises(ValueError, match=r"q\.shape=\(2, 5, 2\)"):
        linear_attention_weights(q[..., 0], k)
    state = initial_state(B, H, M, D)
    with pytest.raises(ValueError, match=r"q_t\.shape=\(2, 5, 2, 8\)"):
        causal_linear_attention_step(q, k[:, 0], v[:, 0], state)
    with pytest.raises(ValueError, match="psi.shape"):
        causal_linear_attention_step(q[:, 0], k[:, 0], v[:, 0, :, :3], state)
    with pytest.raises(ValueError, match="eps=inf"):
        linear_attention(q, k, v, eps=float("inf"))


def test_numpy_scalars_are_accepted():
    q, k, v, _, _ = make_inputs(7, 7, False)
    a = causal_linear_attention(q, k, v, eps=np.float32(1e-6), schedule="chunked", chunk_size=np.int64(4))
    b = causal_linear_attention(q, k, v, schedule="chunked", chunk_size=4)
    assert rel_err(a, b) == 0.0
