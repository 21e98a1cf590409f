"""`linear_attention_projected` (output projection folded in) against the naive reference."""

import keras
import numpy as np
import pytest

from keras_sara.ops import linear_attention_projected
from keras_sara.ops.naive import naive_linear_attention
from tests.backend_utils import rel_err, value_and_grads

B, H, M, D, E = 2, 3, 8, 5, 6


def _inputs(t, s, seed=0):
    rng = np.random.default_rng(seed)
    q = (np.maximum(rng.normal(size=(B, t, H, M)), 0) + 1e-3).astype("float32")
    k = (np.maximum(rng.normal(size=(B, s, H, M)), 0) + 1e-3).astype("float32")
    v = rng.normal(size=(B, s, H, D)).astype("float32")
    w = rng.normal(size=(H, D, E)).astype("float32")
    return q, k, v, w


def _masks(t, s, masked):
    if not masked:
        return None, None
    key_mask = np.ones((B, s), bool)
    key_mask[0, s // 2 :] = False
    key_mask[1, :] = False  # a batch element with no visible key
    query_mask = np.ones((B, t), bool)
    query_mask[0, (t + 1) // 2 :] = False
    return key_mask, query_mask


def _naive(q, k, v, w, key_mask, query_mask):
    out = naive_linear_attention(q, k, v, key_mask=key_mask)  # (B, T, H, D)
    out = keras.ops.einsum("bthd,hde->bte", out, w)  # (B, T, E)
    if query_mask is not None:
        out = keras.ops.where(keras.ops.convert_to_tensor(query_mask)[:, :, None], out, 0.0)
    return out


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("t,s", [(1, 1), (7, 7), (63, 63), (500, 500), (9, 33)])
def test_projected_matches_naive_outputs_and_gradients(t, s, masked):
    q, k, v, w = _inputs(t, s)
    key_mask, query_mask = _masks(t, s, masked)
    cot = np.random.default_rng(1).normal(size=(B, t, E)).astype("float32")
    fast = lambda q, k, v, w: linear_attention_projected(q, k, v, w, key_mask, query_mask)
    slow = lambda q, k, v, w: _naive(q, k, v, w, key_mask, query_mask)
    out_f, grads_f = value_and_grads(fast, [q, k, v, w], cot)
    out_s, grads_s = value_and_grads(slow, [q, k, v, w], cot)
    _assert_close(out_f, grads_f, out_s, grads_s, s)
    assert np.all(np.isfinite(out_f))


def _assert_close(out_f, grads_f, out_s, grads_s, s):
    """Outputs and the gradients for q, k, v, w within 1e-5 relative."""
    assert rel_err(out_f, out_s) <= 1e-5
    for name, gf, gs in zip("qkvw", grads_f, grads_s):
        if name in "qk" and s == 1:
            # One key: the output is v W whatever q and k are (up to eps), so
            # dL/dq and dL/dk are float32 cancellation noise in both
            # implementations; not compared.
            continue
        err = np.linalg.norm(gf - gs) / max(np.linalg.norm(gs), 1e-6)  # all-masked: both 0
        assert err <= 1e-5, (name, err)


def test_projected_rejects_a_kernel_of_the_wrong_shape():
    q, k, v, _ = _inputs(4, 4)
    with pytest.raises(ValueError, match=r"output_kernel.shape=\(3, 4, 6\)"):
        linear_attention_projected(q, k, v, np.zeros((3, 4, 6), "float32"))


def _split(x):
    """(B, L, H, F) -> list of H tensors (B, L, F)."""
    return [x[:, :, h, :] for h in range(x.shape[2])]


@pytest.mark.parametrize("t,s", [(1, 1), (7, 7), (63, 63), (500, 500), (9, 33)])
def test_split_heads_matches_naive_outputs_and_gradients(t, s):
    from keras_sara.ops import linear_attention_split_heads

    q, k, v, w = _inputs(t, s, seed=2)
    cot = np.random.default_rng(3).normal(size=(B, t, E)).astype("float32")
    fast = lambda q, k, v, w: linear_attention_split_heads(
        [q[:, :, h] for h in range(H)], [k[:, :, h] for h in range(H)], [v[:, :, h] for h in range(H)], w
    )
    slow = lambda q, k, v, w: _naive(q, k, v, w, None, None)
    out_f, grads_f = value_and_grads(fast, [q, k, v, w], cot)
    out_s, grads_s = value_and_grads(slow, [q, k, v, w], cot)
    _assert_close(out_f, grads_f, out_s, grads_s, s)


def test_split_heads_rejects_mismatched_heads_and_shapes():
    from keras_sara.ops import linear_attention_split_heads

    q, k, v, w = _inputs(4, 4)
    with pytest.raises(ValueError, match="Received: 3, 2 and 3 tensors"):
        linear_attention_split_heads(_split(q), _split(k)[:2], _split(v), w)
    with pytest.raises(ValueError, match=r"head 0: q.shape=\(2, 4, 8\), k.shape=\(2, 4, 7\)"):
        linear_attention_split_heads(_split(q), [x[..., :7] for x in _split(k)], _split(v), w)
    with pytest.raises(ValueError, match=r"output_kernel.shape=\(3, 4, 6\) for 3 heads of value_dim 5"):
        linear_attention_split_heads(_split(q), _split(k), _split(v), np.zeros((3, 4, 6), "float32"))
