"""More keras-hub adapters: Mixtral, Phi-3, Qwen-MoE, Qwen 3 MoE, SmolLM3, Gemma 3 (decoder and vision).

Each tiny backbone is built from its constructor (random weights). The
checks per adapter: every attention of the class converts, `blend=0.0`
reproduces the teacher, `.keras` reload is exact, and the adapted layer's
linear attention equals a recomputation from its own sublayers with the
naive kernel (causal + padding mask, length 7), outputs and gradients.
"""

import keras
import numpy as np
import pytest

import keras_hub  # noqa: F401  (a missing keras-hub must fail, not skip)

import keras_sara
from keras_sara.adapters import AdaptedAttention
from keras_sara.ops import naive
from tests.adapters.test_keras_hub_adapters import V, _dense_masks, _flat, _tokens
from tests.backend_utils import rel_err, to_numpy, value_and_grads

kh = keras_hub.models
GQA = dict(num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16, intermediate_dim=32)


def mixtral():
    return kh.MixtralBackbone(vocabulary_size=V, num_experts=2, top_k=1, **GQA)


def phi3():
    return kh.Phi3Backbone(vocabulary_size=V, max_sequence_length=16, **GQA)


def phi3_su():
    # max length over pretraining length: cos/sin scaled by sqrt(1 + ln 2 / ln 8) != 1
    return kh.Phi3Backbone(vocabulary_size=V, max_sequence_length=16, pretraining_sequence_length=8,
                           rope_scaling_type="su", rope_scaling_short_factor=[1.0, 1.5],
                           rope_scaling_long_factor=[2.0, 3.0], **GQA)


def qwen_moe():
    return kh.QwenMoeBackbone(vocabulary_size=V, moe_intermediate_dim=32, shared_expert_intermediate_dim=32,
                              num_experts=2, top_k=1, **GQA)


def qwen3_moe():
    return kh.Qwen3MoeBackbone(vocabulary_size=V, moe_intermediate_dim=32, num_experts=2, top_k=1, head_dim=8,
                               **GQA)


def smollm3():
    # layer 1 is a NoPE layer (no rotary embedding), as every fourth layer of SmolLM3-3B
    return kh.SmolLM3Backbone(
        vocabulary_size=V, hidden_dim=16, intermediate_dim=32, num_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=False, attention_dropout=0.0, rope_layer_enabled_list=[True, False],
        layer_types=["attention"] * 2, mlp_bias=False, layer_norm_epsilon=1e-6, max_position_embeddings=16,
        rope_theta=10000.0, partial_rotary_factor=1.0)


def gemma3_local():
    return kh.Gemma3Backbone(vocabulary_size=V, image_size=16, head_dim=8, use_sliding_window_attention=True,
                             sliding_window_size=4, **GQA)


def gemma3_global():
    return kh.Gemma3Backbone(vocabulary_size=V, image_size=16, head_dim=8, global_rope_scaling_factor=2.0, **GQA)


def gemma3_vision():
    """Gemma 3 with its vision tower: one 16 px image as 4 tokens at positions 2-5 of 8."""
    vision = kh.Gemma3VisionEncoder(image_size=16, patch_size=4, num_heads=2, hidden_dim=16, num_layers=1,
                                    intermediate_dim=32, output_dim=16, pool_size=2)
    model = kh.Gemma3Backbone(vocabulary_size=V, image_size=16, head_dim=8, vision_encoder=vision, **GQA)
    inputs = _tokens(length=8)
    vision_mask = np.zeros((2, 8), "int32")
    vision_mask[:, 2:6] = 1
    inputs["token_ids"] = np.where(vision_mask, 0, inputs["token_ids"]).astype("int32")
    inputs["vision_mask"] = vision_mask
    inputs["vision_indices"] = np.tile(np.arange(2, 6, dtype="int32"), (2, 1))
    inputs["images"] = np.random.default_rng(2).random((2, 1, 16, 16, 3)).astype("float32")
    return model, inputs


# name: (builder, attention class name)
TEXT = {
    "mixtral": (mixtral, "CachedMixtralAttention"),
    "phi3": (phi3, "Phi3Attention"),
    "phi3_su": (phi3_su, "Phi3Attention"),
    "qwen_moe": (qwen_moe, "QwenMoeAttention"),
    "qwen3_moe": (qwen3_moe, "Qwen3MoeAttention"),
    "smollm3": (smollm3, "SmolLM3Attention"),
    "gemma3_local": (gemma3_local, "CachedGemma3Attention"),
    "gemma3_global": (gemma3_global, "CachedGemma3Attention"),
}


def _build(name):
    if name == "gemma3_vision":
        return gemma3_vision()
    return TEXT[name][0](), _tokens(pad_from=5)


def _attention(model, class_name):
    return [l for l in model._flatten_layers(include_self=False, recursive=True)
            if (getattr(type(l), "_sara_base", None) or type(l)).__name__ == class_name]


def _classes(name):
    if name == "gemma3_vision":
        return ("CachedGemma3Attention", "Gemma3VisionAttention")
    return (TEXT[name][1],)


@pytest.mark.parametrize("name", [*TEXT, "gemma3_vision"])
def test_backbone_converts_reloads_and_blend_zero_is_the_teacher(name, tmp_path):
    teacher, inputs = _build(name)
    teacher_out = _flat(teacher(inputs))
    student, report = keras_sara.convert(teacher, probe=inputs)
    assert not report.skipped, report.skipped
    count = 0
    for class_name in _classes(name):
        layers = _attention(student, class_name)
        assert len(layers) == len(_attention(teacher, class_name)) > 0
        assert all(isinstance(l, AdaptedAttention) for l in layers)
        count += len(layers)
    assert report.num_converted == count
    out = _flat(student(inputs))
    assert np.isfinite(out).all()
    assert not np.allclose(out, teacher_out)  # the linear path ran

    path = str(tmp_path / f"{name}.keras")
    student.save(path)
    loaded = keras.models.load_model(path)
    assert sum(isinstance(l, AdaptedAttention) for l in loaded._flatten_layers()) == count
    np.testing.assert_array_equal(_flat(loaded(inputs)), out)

    blended, report = keras_sara.convert(teacher, probe=inputs, blend=0.0)
    assert report.max_abs_error < 1e-6
    np.testing.assert_allclose(_flat(blended(inputs)), teacher_out, rtol=0, atol=1e-6)


def _reference(layer, x, mask, class_name):
    """The adapted layer's linear attention, recomputed from its own sublayers and the naive kernel."""
    fm, eps = layer.feature_map, layer.eps

    def attend(q, k, v, rotate):
        fq, fk = fm(q, role="query"), fm(k, role="key")
        q_rot, k_rot = (None, None) if rotate is None else (rotate(fq), rotate(fk))
        return naive.naive_structured_linear_attention(fq, fk, v, mask, q_rot, k_rot, eps)

    if class_name == "SmolLM3Attention":
        from keras_hub.src.models.smollm3.smollm3_utils import apply_rotary_pos_single

        def heads(t, n):
            return keras.ops.reshape(t, (2, 7, n, layer.head_dim))

        def rotate(t):
            cos, sin = layer.rotary_embedding(t, start_index=0)
            return apply_rotary_pos_single(t, cos, sin, expansion_axis=2)

        q = heads(layer.q_proj(x), layer.num_attention_heads)
        k, v = (heads(p(x), layer.num_key_value_heads) for p in (layer.k_proj, layer.v_proj))
        return layer.o_proj(attend(q, k, v, rotate if layer.use_rope else None))
    if class_name == "CachedGemma3Attention":
        q, k = layer.query_norm(layer.query_dense(x)), layer.key_norm(layer.key_dense(x))
        return layer.output_dense(attend(q, k, layer.value_dense(x), lambda t: layer._apply_rope(t, 0)))
    if class_name == "Qwen3MoeAttention":
        q = layer._query_dense_layer_norm(layer._query_dense(x))
        k = layer._key_dense_layer_norm(layer._key_dense(x))
        v, out_dense = layer._value_dense(x), layer._output_dense
    else:  # Mixtral, Phi-3 (public projections), Qwen-MoE (private output)
        q, k, v = layer.query_dense(x), layer.key_dense(x), layer.value_dense(x)
        out_dense = getattr(layer, "output_dense", None) or layer._output_dense
    rope = layer.rotary_embedding_layer
    scale = getattr(rope, "embedding_scaling_factor", 1.0)  # Phi-3 "su": a temperature, divided out
    return out_dense(attend(q, k, v, lambda t: rope(t, start_index=0) / scale))


@pytest.mark.parametrize("name,index", [*((n, 0) for n in TEXT), ("smollm3", 1)])
def test_adapter_matches_naive_reference(name, index):
    teacher, _ = _build(name)
    class_name = TEXT[name][1]
    student, _ = keras_sara.convert(teacher, verify=False)
    layer = _attention(student, class_name)[index]
    if name == "phi3_su":
        assert layer.rotary_embedding_layer.embedding_scaling_factor > 1.0
    x = np.random.default_rng(3).standard_normal((2, 7, 16)).astype("float32")
    mask = _dense_masks(7)["causal_padding"]
    cot = np.random.default_rng(4).standard_normal((2, 7, 16)).astype("float32")
    out, (grad,) = value_and_grads(lambda t: layer(t, attention_mask=mask), [x], cot)
    ref, (ref_grad,) = value_and_grads(lambda t: _reference(layer, t, mask, class_name), [x], cot, jit=False)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(grad, ref_grad) < 1e-4


def test_gemma3_vision_attention_matches_naive_reference():
    teacher, _ = gemma3_vision()
    student, _ = keras_sara.convert(teacher, verify=False)
    (layer,) = _attention(student, "Gemma3VisionAttention")
    x = np.random.default_rng(5).standard_normal((2, 9, 16)).astype("float32")

    def reference(t):
        def heads(y):
            return keras.ops.reshape(y, (2, 9, 2, 8))

        fq = layer.feature_map(heads(layer.query_proj(t)), role="query")
        fk = layer.feature_map(heads(layer.key_proj(t)), role="key")
        out = naive.naive_structured_linear_attention(fq, fk, heads(layer.value_proj(t)), None, eps=layer.eps)
        return layer.out_proj(keras.ops.reshape(out, (2, 9, 16)))

    cot = np.random.default_rng(6).standard_normal((2, 9, 16)).astype("float32")
    out, (grad,) = value_and_grads(lambda t: layer(t)[0], [x], cot)
    ref, (ref_grad,) = value_and_grads(reference, [x], cot, jit=False)
    assert rel_err(out, ref) < 1e-5 and rel_err(grad, ref_grad) < 1e-4


def test_notes_name_what_the_linear_path_does_not_apply():
    _, report = keras_sara.convert(gemma3_local(), probe=_tokens())
    assert "sliding window of 4 not applied" in " ".join(c.note for c in report.converted)
    _, report = keras_sara.convert(phi3_su(), probe=_tokens())
    assert "su-scaled RoPE" in " ".join(c.note for c in report.converted)
    _, report = keras_sara.convert(qwen3_moe(), probe=_tokens())
    assert "sliding window of 32768 not applied" in " ".join(c.note for c in report.converted)


@pytest.mark.parametrize("name", ["mixtral", "phi3", "qwen_moe", "qwen3_moe", "smollm3", "gemma3_local"])
def test_cached_decoding_loop_matches_one_shot(name):
    """Token by token through SARA's cache (keys before RoPE) equals the causal one-shot call."""
    teacher, _ = _build(name)
    student, _ = keras_sara.convert(teacher, verify=False)
    layer = _attention(student, TEXT[name][1])[0]
    x = np.random.default_rng(7).standard_normal((2, 7, 16)).astype("float32")
    full = to_numpy(layer(x, attention_mask=_dense_masks(7)["causal_padding"]))
    heads = layer.num_key_value_heads
    head_dim = getattr(layer, "head_dim", None) or 16 // layer.num_query_heads
    if name.startswith("gemma3"):
        cache = (np.zeros((2, 7, heads, head_dim), "float32"),) * 2
    else:
        cache = np.zeros((2, 2, 7, heads, head_dim), "float32")
    steps = []
    for t in range(7):
        mask = _dense_masks(7)["causal_padding"][:, t:t + 1]  # (B, 1, S): keys up to t, padding off
        if name == "smollm3":  # its cache arguments are keywords of `**kwargs`: tensors only
            out, cache = layer(x[:, t:t + 1], attention_mask=mask, self_attention_cache=cache,
                               self_attention_cache_update_index=keras.ops.convert_to_tensor(t))
        else:
            out, cache = layer(x[:, t:t + 1], attention_mask=mask, cache=cache, cache_update_index=t)
        steps.append(to_numpy(out))
    assert rel_err(np.concatenate(steps, axis=1), full) < 1e-5
