"""`keras_sara.ops.structured` against its naive reference: outputs and gradients.

Grouped-query heads, the rotary numerator, key padding, causal and
prefix-causal (PaliGemma) masks, lengths that are not multiples of the chunk.
"""

import numpy as np
import pytest
from keras import ops

from keras_sara.ops import naive, structured
from tests.backend_utils import rel_err, to_numpy, value_and_grads

B, N, K, M, D = 2, 4, 2, 6, 3


def _dense(bidir, causal, t):
    tri = np.tril(np.ones((t, t), bool))
    mask = np.zeros((B, t, t), bool)
    if bidir is not None:
        mask |= bidir[:, None, :]
    if causal is not None:
        mask |= causal[:, None, :] & tri[None]
    if bidir is None and causal is None:
        mask[:] = True
    return mask


def _masks(kind, t, rng):
    pad = np.ones((B, t), bool)
    pad[1, t - 3:] = False  # padding at the end of one row
    if kind == "none":
        return None, None
    if kind == "padding":
        return pad, None
    if kind == "causal":
        return None, np.ones((B, t), bool)
    if kind == "causal_padding":
        return None, pad
    prefix = np.zeros((B, t), bool)
    prefix[0, :3] = True
    prefix[1, :5] = True
    prefix &= pad
    return prefix, pad & ~prefix  # PaliGemma: prefix bidirectional, response causal


def _inputs(t, rng, rotary):
    q = rng.random((B, t, N, M)).astype("float32")
    k = rng.random((B, t, K, M)).astype("float32")
    v = rng.standard_normal((B, t, K, D)).astype("float32")
    q_rot = rng.standard_normal((B, t, N, M)).astype("float32") if rotary else None
    k_rot = rng.standard_normal((B, t, K, M)).astype("float32") if rotary else None
    return q, k, v, q_rot, k_rot


@pytest.mark.parametrize("kind", ["none", "padding", "causal", "causal_padding", "prefix"])
@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("length", [1, 7, 9])
def test_structured_matches_naive_outputs_and_gradients(kind, rotary, length):
    rng = np.random.default_rng(length)
    q, k, v, q_rot, k_rot = _inputs(length, rng, rotary)
    bidir, causal = _masks(kind, length, rng) if length > 5 else (None, None)
    dense = _dense(bidir, causal, length)
    cot = rng.standard_normal((B, length, N, D)).astype("float32")

    def fast(q, k, v, *rot):
        qr, kr = (rot if rotary else (None, None))
        return structured.structured_linear_attention(q, k, v, bidir, causal, qr, kr, chunk_size=4)

    def ref(q, k, v, *rot):
        qr, kr = (rot if rotary else (None, None))
        return naive.naive_structured_linear_attention(q, k, v, dense, qr, kr)

    xs = [q, k, v] + ([q_rot, k_rot] if rotary else [])
    out_f, grads_f = value_and_grads(fast, xs, cot)
    out_r, grads_r = value_and_grads(ref, xs, cot, jit=False)
    assert rel_err(out_f, out_r) < 1e-5
    for gf, gr in zip(grads_f, grads_r):  # absolute: with one key d out/d q is ~0
        assert np.abs(gf - gr).max() <= 1e-4 * max(1.0, np.abs(gr).max())


@pytest.mark.parametrize("kind", ["padding", "causal_padding", "prefix"])
def test_masked_kernel_attention_matches_naive(kind):
    rng = np.random.default_rng(1)
    q, k, v, q_rot, k_rot = _inputs(9, rng, True)
    dense = _dense(*_masks(kind, 9, rng), 9)
    out = structured.masked_kernel_attention(q, k, v, dense, q_rot, k_rot)
    ref = naive.naive_structured_linear_attention(q, k, v, dense, q_rot, k_rot)
    assert rel_err(out, ref) < 1e-5


def test_grouped_state_equals_repeated_heads():
    """One state per key/value head gives what repeating the heads (Llama's way) gives."""
    rng = np.random.default_rng(2)
    q, k, v, _, _ = _inputs(8, rng, False)
    grouped = structured.structured_linear_attention(q, k, v)
    repeated = structured.structured_linear_attention(
        q, np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2))
    assert rel_err(grouped, repeated) < 1e-6


def test_garbage_in_masked_keys_does_not_leak():
    rng = np.random.default_rng(3)
    q, k, v, q_rot, k_rot = _inputs(9, rng, True)
    bidir, causal = _masks("prefix", 9, rng)
    clean = structured.structured_linear_attention(q, k, v, bidir, causal, q_rot, k_rot)
    hidden = ~(bidir | causal)
    k2, v2, kr2 = k.copy(), v.copy(), k_rot.copy()
    k2[hidden], v2[hidden], kr2[hidden] = np.nan, np.inf, np.nan
    dirty = structured.structured_linear_attention(q, k2, v2, bidir, causal, q_rot, kr2)
    dense = _dense(bidir, causal, 9)
    dirty_kernel = structured.masked_kernel_attention(q, k2, v2, dense, q_rot, kr2)
    assert np.isfinite(to_numpy(dirty)).all() and np.isfinite(to_numpy(dirty_kernel)).all()
    np.testing.assert_allclose(to_numpy(dirty), to_numpy(clean), atol=1e-6)


@pytest.mark.parametrize("kind", ["padding", "causal", "causal_padding", "prefix"])
def test_split_prefix_causal_mask_reads_keras_hub_masks(kind):
    rng = np.random.default_rng(4)
    dense = _dense(*_masks(kind, 9, rng), 9)
    bidir, causal, exact = structured.split_prefix_causal_mask(dense)
    assert bool(to_numpy(exact))
    np.testing.assert_array_equal(_dense(to_numpy(bidir), to_numpy(causal), 9), dense)


def test_split_prefix_causal_mask_flags_other_masks():
    dense = _dense(None, np.ones((B, 6), bool), 6)
    dense[0, 1, 4] = True  # one query sees one future key: not prefix-causal
    assert not bool(to_numpy(structured.split_prefix_causal_mask(dense)[2]))
    window = np.tril(np.ones((6, 6), bool)) & ~np.tril(np.ones((6, 6), bool), -3)  # sliding window
    assert not bool(to_numpy(structured.split_prefix_causal_mask(np.broadcast_to(window, (B, 6, 6)))[2]))


def test_bad_shapes_name_the_argument():
    q = np.zeros((1, 4, 3, 2), "float32")
    k = np.zeros((1, 4, 2, 2), "float32")
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        structured.structured_linear_attention(q, k, k)
    with pytest.raises(ValueError, match="q_rot.*k_rot"):
        structured.structured_linear_attention(k, k, k, q_rot=k)
    with pytest.raises(ValueError, match="mask.shape"):
        structured.split_prefix_causal_mask(np.ones((4, 4), bool))
