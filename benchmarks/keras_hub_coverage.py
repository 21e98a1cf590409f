"""Which keras-hub backbones does `keras_sara.convert` turn into linear attention?

Every class in `keras_hub.models` whose name ends in "Backbone" and that has
attention gets a tiny builder in `TINY_BACKBONES`: the backbone built from
its constructor with random weights (`keras.utils.set_random_seed(SEED)`,
nothing downloaded, no preset), hidden sizes of 8-32, one or two layers,
two heads, a vocabulary of `VOCAB` and images of 16-64 px, with a batch of
valid inputs (`build_tiny(name) -> (backbone, inputs)`: token ids in
`[1, VOCAB)`, padding masks all ones, images uniform in [0, 1)). Backbones
without attention (CNNs, FNet's Fourier mixing, RWKV's recurrence) are
listed in `NO_ATTENTION` with the reason instead.

For each backbone (or the `--only` subset) this script

1. calls `keras_sara.convert(backbone, probe=inputs)` and records the
   report: attention layers converted, layers skipped with their reasons,
   the output drift on the probe batch (`relative_error`);
2. lists the attention layers of the original and of the converted model:
   every layer whose class name contains "Attention" and that holds no such
   layer itself (so a block that wraps an attention layer is not counted
   twice; helper layers in `NOT_ATTENTION_CLASSES` that only build masks
   are left out, and `INLINE_ATTENTION_CLASSES` that compute attention in
   their own `call` are added). "softmax left" counts those of the
   converted model that are not keras_sara layers: attention that `convert`
   did not reach, whether or not its report lists it as skipped. A layer
   shared by two sub-models is counted once here, though the report may
   list it under both paths (converted under one, skipped under the other);
3. saves the converted model as `.keras`, loads it back in the same process
   with `keras.models.load_model` and checks that its outputs on the probe
   batch equal the converted model's (max abs difference < `RELOAD_ATOL`);
4. times each step.

A backbone "converts fully" when at least one attention layer was converted
and no softmax attention is left. An attention class counts as converted in
the summary when `convert` replaced it in at least one backbone. Errors (build, convert, reload) are caught
and their first line goes in the `error` column, so one backbone that fails
does not stop the others.

Writes `coverage.csv`, `coverage.json` (rows, summary, attention classes per
backbone, config, machine, command, date) and `coverage.md` under
`--out-dir`, each atomically; progress goes to stderr, the table and the
summary to stdout.

Usage:
    python benchmarks/keras_hub_coverage.py                       # every backbone, a few minutes
    python benchmarks/keras_hub_coverage.py --only BertBackbone,ViTBackbone
    python benchmarks/keras_hub_coverage.py --backend-note "TF 2.20 CPU, 2 cores"
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402

import keras_sara  # noqa: E402  (registers SARA layers for load_model)
from keras_sara.utils import atomic_write, work_directory  # noqa: E402

# ----------------------------------------------------------------- constants

SEED = 0
BATCH = 2
SEQ = 8  # text tokens per example
VOCAB = 128
HIDDEN = 16
HEADS = 2
HEAD_DIM = HIDDEN // HEADS
FFN = 32
LAYERS = 1
IMAGE = 32  # px; patch 8 gives 16 tokens
PATCH = 8
RELOAD_ATOL = 1e-5
DEFAULT_OUT_DIR = os.path.join(REPO_ROOT, "benchmarks", "results", "keras_hub_coverage")

# Layers whose class name contains "Attention" but that compute no attention.
NOT_ATTENTION_CLASSES = frozenset({"XLNetAttentionMaskLayer", "ComputeAttentionMask"})
# Layers that compute softmax attention in their own `call` but whose class
# name does not say so.
INLINE_ATTENTION_CLASSES = frozenset({"MMDiTBlock"})

# Abstract bases: not models of their own.
ABSTRACT_BACKBONES = ("Backbone", "FeaturePyramidBackbone")

NO_ATTENTION = {
    "BASNetBackbone": "CNN refinement head over a CNN image encoder (ResNet)",
    "CSPNetBackbone": "CNN",
    "DeepLabV3Backbone": "CNN (atrous pyramid pooling) over a CNN image encoder",
    "DenseNetBackbone": "CNN",
    "EfficientNetBackbone": "CNN",
    "FNetBackbone": "Fourier-transform token mixing, no attention",
    "HGNetV2Backbone": "CNN",
    "MobileNetBackbone": "CNN",
    "RWKV7Backbone": "RWKV-7 recurrent time mixing, no softmax attention",
    "ResNetBackbone": "CNN",
    "RetinaNetBackbone": "CNN feature pyramid over a CNN image encoder",
    "VGGBackbone": "CNN",
    "XceptionBackbone": "CNN",
}

CSV_COLUMNS = (
    "backbone", "status", "params", "attention_layers", "num_converted", "num_skipped",
    "softmax_left", "fully_converted", "relative_error", "max_abs_error", "reload_ok",
    "reload_max_abs_diff", "build_s", "convert_s", "reload_s", "total_s",
    "attention_classes", "converted_classes", "softmax_left_classes", "skipped", "error",
)


def log(msg: str) -> None:
    """Progress goes to stderr; the table to stdout."""
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------- inputs


def _fill(name: str, shape, dtype: str, rng) -> np.ndarray:
    """A valid value for one input, chosen by its name and dtype."""
    shape = tuple(BATCH if i == 0 and d is None else (SEQ if d is None else d) for i, d in enumerate(shape))
    if "padding_mask" in name or "bool" in dtype:
        return np.ones(shape, dtype)
    if "int" in dtype:
        if "token_ids" in name:
            return rng.integers(1, VOCAB, shape).astype(dtype)
        return np.zeros(shape, dtype)
    if "image" in name or "pixel" in name:
        return rng.uniform(size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def make_inputs(backbone, **overrides):
    """A batch for `backbone.input` (dict, list or one tensor); `overrides` replace named entries."""
    rng = np.random.default_rng(SEED)
    structure = backbone.input
    if isinstance(structure, dict):
        batch = {k: _fill(k, t.shape, str(t.dtype), rng) for k, t in structure.items()}
        batch.update(overrides)
        return batch
    if isinstance(structure, (list, tuple)):  # Gemma3n: inputs by position, matched here by name
        names = [getattr(t, "name", "") for t in structure]
        return [overrides[n] if n in overrides else _fill(n, t.shape, str(t.dtype), rng)
                for n, t in zip(names, structure)]
    return _fill(getattr(structure, "name", "") or "images", structure.shape, str(structure.dtype), rng)


# ------------------------------------------------------------------ builders

kh = keras_hub.models


def _text_kwargs(**extra):
    return dict(vocabulary_size=VOCAB, num_layers=LAYERS, hidden_dim=HIDDEN, intermediate_dim=FFN, **extra)


def _decoder_kwargs(**extra):
    """Keyword arguments of keras-hub's grouped-query decoders (Llama, Mistral, Qwen, ...)."""
    return _text_kwargs(num_query_heads=HEADS, num_key_value_heads=1, **extra)


def _vit_image():
    return (IMAGE, IMAGE, 3)


def _clip_pair(vision_cls, text_cls, **text_extra):
    vision = vision_cls(patch_size=PATCH, hidden_dim=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                        intermediate_dim=FFN, image_shape=_vit_image())
    text = text_cls(vocabulary_size=VOCAB, embedding_dim=HIDDEN, hidden_dim=HIDDEN, num_layers=LAYERS,
                    num_heads=HEADS, intermediate_dim=FFN, max_sequence_length=SEQ, **text_extra)
    return vision, text


def _sam():
    from keras_hub.src.models.sam.sam_mask_decoder import SAMMaskDecoder
    from keras_hub.src.models.sam.sam_prompt_encoder import SAMPromptEncoder

    size = 16
    image_encoder = kh.ViTDetBackbone(
        hidden_size=HIDDEN, num_layers=2, intermediate_dim=FFN, num_heads=HEADS,
        global_attention_layer_indices=[1], patch_size=4, num_output_channels=8, window_size=2,
        image_shape=(size, size, 3),
    )
    prompt_encoder = SAMPromptEncoder(hidden_size=8, image_embedding_size=(4, 4), input_image_size=(size, size),
                                      mask_in_channels=16)
    mask_decoder = SAMMaskDecoder(num_layers=1, hidden_size=8, intermediate_dim=16, num_heads=2, embedding_dim=8,
                                  num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=8)
    backbone = kh.SAMBackbone(image_encoder=image_encoder, prompt_encoder=prompt_encoder,
                              mask_decoder=mask_decoder)
    rng = np.random.default_rng(SEED)
    inputs = {
        "images": rng.uniform(size=(BATCH, size, size, 3)).astype("float32"),
        "points": rng.uniform(0, size, (BATCH, 1, 2)).astype("float32"),
        "labels": np.ones((BATCH, 1), "float32"),
        "boxes": rng.uniform(0, size, (BATCH, 1, 2, 2)).astype("float32"),
        "masks": np.zeros((BATCH, 0, size, size, 1), "float32"),
    }
    return backbone, inputs


def _sam3():
    from keras_hub.src.models.sam3.sam3_detr_decoder import SAM3DetrDecoder
    from keras_hub.src.models.sam3.sam3_detr_encoder import SAM3DetrEncoder
    from keras_hub.src.models.sam3.sam3_geometry_encoder import SAM3GeometryEncoder
    from keras_hub.src.models.sam3.sam3_mask_decoder import SAM3MaskDecoder
    from keras_hub.src.models.sam3.sam3_text_encoder import SAM3TextEncoder
    from keras_hub.src.models.sam3.sam3_vision_encoder import SAM3VisionEncoder

    image = (56, 56, 3)  # patch 14: 4 x 4 tokens
    vision = SAM3VisionEncoder(
        image_shape=image, patch_size=14, num_layers=2, hidden_dim=HIDDEN, intermediate_dim=FFN,
        num_heads=HEADS, fpn_hidden_dim=HIDDEN, fpn_scale_factors=[4.0, 2.0, 1.0, 0.5],
        pretrain_image_shape=(28, 28, 3), window_size=2, global_attn_indexes=[1],
    )
    text = SAM3TextEncoder(vocabulary_size=VOCAB, embedding_dim=HIDDEN, hidden_dim=HIDDEN, num_layers=LAYERS,
                           num_heads=HEADS, intermediate_dim=FFN)
    geometry = SAM3GeometryEncoder(num_layers=1, hidden_dim=HIDDEN, intermediate_dim=FFN, num_heads=HEADS,
                                   roi_size=7)
    detr_encoder = SAM3DetrEncoder(num_layers=1, hidden_dim=HIDDEN, intermediate_dim=FFN, num_heads=HEADS)
    detr_decoder = SAM3DetrDecoder(image_shape=image, patch_size=14, num_layers=1, hidden_dim=HIDDEN,
                                   intermediate_dim=FFN, num_heads=HEADS, num_queries=8)
    mask_decoder = SAM3MaskDecoder(num_upsampling_stages=3, hidden_dim=HIDDEN, num_heads=HEADS)
    backbone = kh.SAM3PromptableConceptBackbone(
        vision_encoder=vision, text_encoder=text, geometry_encoder=geometry, detr_encoder=detr_encoder,
        detr_decoder=detr_decoder, mask_decoder=mask_decoder,
    )
    return backbone, make_inputs(backbone, boxes=np.zeros((BATCH, 1, 5), "float32"),
                                 box_labels=np.zeros((BATCH, 1), "int32"))


def _blip2():
    vision = kh.BLIP2VisionEncoder(
        image_size=IMAGE, patch_size=PATCH, num_layers=LAYERS, num_heads=HEADS, hidden_dim=HIDDEN,
        intermediate_dim=FFN, use_patch_bias=True, use_class_token=True, use_mha_bias=True, use_mlp_bias=True,
        dropout_rate=0.0, layer_norm_epsilon=1e-6, initializer_range=0.02,
    )
    qformer = kh.BLIP2QFormer(num_query_tokens=4, num_layers=LAYERS, num_heads=HEADS, hidden_dim=HIDDEN,
                              intermediate_dim=FFN, vision_dim=HIDDEN, cross_attention_frequency=1, dropout=0.0,
                              layer_norm_epsilon=1e-6)
    from keras_hub.src.models.blip2.blip2_custom_opt import BLIP2CustomOPT

    language_model = BLIP2CustomOPT(vocabulary_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, hidden_dim=HIDDEN,
                                    intermediate_dim=FFN, max_sequence_length=32, num_query_tokens=4,
                                    dropout=0.0, qformer_hidden_dim=HIDDEN)
    backbone = kh.BLIP2Backbone(vision_encoder=vision, qformer=qformer, language_model=language_model)
    return backbone, make_inputs(backbone)


def _pali_gemma():
    backbone = kh.PaliGemmaBackbone(
        vocabulary_size=VOCAB, image_size=16, num_layers=LAYERS, num_query_heads=HEADS, num_key_value_heads=1,
        hidden_dim=HIDDEN, intermediate_dim=FFN, head_dim=HEAD_DIM, vit_patch_size=4, vit_num_heads=HEADS,
        vit_hidden_dim=HIDDEN, vit_num_layers=LAYERS, vit_intermediate_dim=FFN,
    )
    return backbone, make_inputs(backbone)


def _gemma3n():
    from keras_hub.src.models.gemma3n.gemma3n_audio_encoder import Gemma3nAudioEncoder

    # Text and audio (one clip of 16 frames x 16 mel bins); no vision tower (MobileNetV5 has its own row).
    audio = Gemma3nAudioEncoder(
        hidden_size=8, input_feat_size=16, sscp_conv_channel_size=[4, 8], sscp_conv_kernel_size=[(3, 3), (3, 3)],
        sscp_conv_stride_size=[(2, 2), (2, 2)], sscp_conv_group_norm_eps=1e-5, num_hidden_layers=1,
        rms_norm_eps=1e-6, gradient_clipping=1.0, residual_weight=0.5, num_attention_heads=1,
        attention_chunk_size=4, num_attention_context_right=5, num_attention_context_left=5,
        attention_logit_cap=50.0, conv_kernel_size=5, reduction_factor=1,
    )
    backbone = kh.Gemma3nBackbone(
        text_vocab_size=VOCAB, text_hidden_size=HIDDEN, num_hidden_layers=LAYERS, pad_token_id=0,
        num_attention_heads=HEADS, num_key_value_heads=1, head_dim=HEAD_DIM, intermediate_size=[FFN],
        hidden_activation="gelu_approximate", layer_types=["full_attention"], sliding_window=4,
        rope_theta=10000.0, max_position_embeddings=SEQ, vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=2, altup_num_inputs=2, laurel_rank=1,
        audio_encoder_config=audio.get_config(), audio_hidden_size=8,
    )
    rng = np.random.default_rng(SEED)
    # Text tokens below the image / audio token ids (98, 99) and the soft-token offsets (100+).
    return backbone, make_inputs(
        backbone, token_ids=rng.integers(1, 98, (BATCH, SEQ)).astype("int32"),
        input_features=rng.standard_normal((BATCH, 1, 16, 16)).astype("float32"),
        input_features_mask=np.ones((BATCH, 1, 16), bool),
    )


def _vision_slots(num_tokens: int, start: int = 2):
    """`vision_mask` (BATCH, SEQ) and `vision_indices` (BATCH, num_tokens): image tokens at `start`."""
    mask = np.zeros((BATCH, SEQ), "int32")
    mask[:, start:start + num_tokens] = 1
    indices = np.tile(np.arange(start, start + num_tokens, dtype="int32"), (BATCH, 1))
    return mask, indices


def _gemma3():
    # Text and vision: one 16 px image, patch 4, pooled 2 x 2: 4 image tokens.
    vision = kh.Gemma3VisionEncoder(image_size=16, patch_size=4, num_heads=HEADS, hidden_dim=HIDDEN,
                                    num_layers=LAYERS, intermediate_dim=FFN, output_dim=HIDDEN, pool_size=2)
    backbone = kh.Gemma3Backbone(**_decoder_kwargs(image_size=16, head_dim=HEAD_DIM, sliding_window_size=4,
                                                   vision_encoder=vision))
    mask, indices = _vision_slots(4)
    rng = np.random.default_rng(SEED)
    return backbone, make_inputs(backbone, images=rng.uniform(size=(BATCH, 1, 16, 16, 3)).astype("float32"),
                                 vision_mask=mask, vision_indices=indices)


def _gemma4():
    # Text and vision: one 16 px image as 16 patches of 4 x 4 x 3, pooled 2 x 2: 4 image tokens.
    vision = kh.Gemma4VisionEncoder(image_size=16, patch_size=4, pool_size=2, num_layers=LAYERS, num_heads=HEADS,
                                    head_dim=HEAD_DIM, num_key_value_heads=HEADS, hidden_dim=HIDDEN,
                                    intermediate_dim=FFN, output_dim=HIDDEN)
    backbone = kh.Gemma4Backbone(
        vocabulary_size=VOCAB, image_size=16, num_layers=2, num_query_heads=HEADS, num_key_value_heads=1,
        hidden_dim=HIDDEN, intermediate_dim=FFN, head_dim=HEAD_DIM, sliding_window_size=4, sliding_window_pattern=2,
        vision_encoder=vision,
    )
    mask, indices = _vision_slots(4)
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1).reshape(16, 2)  # (patches, 2)
    rng = np.random.default_rng(SEED)
    return backbone, make_inputs(
        backbone, pixel_values=rng.uniform(size=(BATCH, 1, 16, 4 * 4 * 3)).astype("float32"),
        pixel_position_ids=np.tile(grid.astype("int32"), (BATCH, 1, 1, 1)),
        position_ids=np.tile(np.arange(SEQ, dtype="int32"), (BATCH, 1)), vision_mask=mask, vision_indices=indices,
    )


def _t5gemma(cls, **extra):
    def build():
        backbone = cls(
            vocabulary_size=VOCAB, encoder_hidden_dim=HIDDEN, encoder_intermediate_dim=FFN,
            encoder_num_layers=LAYERS, encoder_num_attention_heads=HEADS, encoder_num_key_value_heads=1,
            encoder_head_dim=HEAD_DIM, encoder_layer_types=["full_attention"] * LAYERS,
            decoder_hidden_dim=HIDDEN, decoder_intermediate_dim=FFN, decoder_num_layers=LAYERS,
            decoder_num_attention_heads=HEADS, decoder_num_key_value_heads=1, decoder_head_dim=HEAD_DIM,
            decoder_layer_types=["full_attention"] * LAYERS, **extra,
        )
        return backbone, make_inputs(backbone)

    return build


def _moonshine():
    backbone = kh.MoonshineBackbone(
        vocabulary_size=VOCAB, filter_dim=HIDDEN, encoder_num_layers=LAYERS, decoder_num_layers=LAYERS,
        hidden_dim=HIDDEN, intermediate_dim=FFN, encoder_num_heads=HEADS, decoder_num_heads=HEADS,
        feedforward_expansion_factor=2,
    )
    # Raw audio: the stem's strided convolutions (64, 3, 2) turn 1,600 samples into 2 frames.
    samples = 1600
    rng = np.random.default_rng(SEED)
    return backbone, make_inputs(
        backbone, encoder_input_values=rng.standard_normal((BATCH, samples, 1)).astype("float32"),
        encoder_padding_mask=np.ones((BATCH, samples), bool),
    )


def _mit(image=(IMAGE, IMAGE, 3)):
    return kh.MiTBackbone(
        image_shape=image, num_layers=2, hidden_dims=[8, HIDDEN], layerwise_depths=[1, 1],
        layerwise_num_heads=[1, HEADS], layerwise_sr_ratios=[2, 1], layerwise_patch_sizes=[7, 3],
        layerwise_strides=[4, 2], max_drop_path_rate=0.0,
    )


def _dinov2(**extra):
    return kh.DINOV2Backbone(patch_size=PATCH, num_layers=LAYERS, hidden_dim=HIDDEN, num_heads=HEADS,
                             intermediate_dim=FFN, image_shape=_vit_image(),
                             position_embedding_shape=_vit_image(), **extra)


def _depth_anything():
    # Patch 4: an 8 x 8 token grid, which the neck's 0.5 reassembly and 3 x 3 convolutions need.
    encoder = kh.DINOV2Backbone(patch_size=4, num_layers=4, hidden_dim=HIDDEN, num_heads=HEADS,
                                intermediate_dim=FFN, image_shape=_vit_image(), position_embedding_shape=_vit_image())
    backbone = kh.DepthAnythingBackbone(
        image_encoder=encoder, reassemble_factors=[4, 2, 1, 0.5], neck_hidden_dims=[8, 8, 16, 16],
        fusion_hidden_dim=16, head_hidden_dim=8, head_in_index=-1,
        feature_keys=["stage1", "stage2", "stage3", "stage4"],
    )
    return backbone, make_inputs(backbone)


def _parseq():
    encoder = kh.ViTBackbone(image_shape=(IMAGE, 2 * IMAGE, 3), patch_size=PATCH, num_layers=LAYERS,
                             num_heads=HEADS, hidden_dim=HIDDEN, mlp_dim=FFN, use_class_token=False)
    backbone = kh.PARSeqBackbone(image_encoder=encoder, vocabulary_size=VOCAB, max_label_length=SEQ,
                                 decoder_hidden_dim=HIDDEN, num_decoder_layers=LAYERS, num_decoder_heads=HEADS,
                                 decoder_mlp_dim=FFN, dropout_rate=0.0, attention_dropout=0.0)
    return backbone, make_inputs(backbone)


def _dfine():
    encoder = kh.HGNetV2Backbone(
        stem_channels=[3, 8, 8],
        stackwise_stage_filters=[[8, 8, 16, 1, 1, 3], [16, 8, 32, 1, 1, 3], [32, 16, 64, 1, 1, 3],
                                 [64, 16, 64, 1, 1, 3]],
        apply_downsample=[False, True, True, True], use_lightweight_conv_block=[False, False, True, True],
        depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 64], embedding_size=8, use_learnable_affine_block=True,
        hidden_act="relu", image_shape=(None, None, 3), out_features=["stage3", "stage4"],
        data_format="channels_last",
    )
    backbone = kh.DFineBackbone(
        backbone=encoder, decoder_in_channels=[HIDDEN, HIDDEN], encoder_hidden_dim=HIDDEN, num_denoising=0,
        num_labels=4, hidden_dim=HIDDEN, learn_initial_query=False, num_queries=8, anchor_image_size=(64, 64),
        feat_strides=[16, 32], num_feature_levels=2, encoder_in_channels=[64, 64], encode_proj_layers=[1],
        num_attention_heads=HEADS, encoder_ffn_dim=FFN, num_encoder_layers=1, hidden_expansion=0.34,
        depth_multiplier=0.5, eval_idx=-1, num_decoder_layers=1, decoder_attention_heads=HEADS,
        decoder_ffn_dim=FFN, decoder_n_points=[2, 2], lqe_hidden_dim=8, num_lqe_layers=1,
        out_features=["stage3", "stage4"], image_shape=(None, None, 3), data_format="channels_last", seed=SEED,
    )
    rng = np.random.default_rng(SEED)
    return backbone, rng.uniform(size=(BATCH, 64, 64, 3)).astype("float32")


def _mobilenetv5():
    # One inverted-residual stage, then a multi-query attention stage.
    stacks = [["er"], ["mqa"]]
    args = {
        "stackwise_block_types": stacks,
        "stackwise_num_blocks": [1, 1],
        "stackwise_num_filters": [[16], [16]],
        "stackwise_strides": [[2], [1]],
        "stackwise_act_layers": [["relu"], ["relu"]],
        "stackwise_exp_ratios": [[2.0], [0.0]],
        "stackwise_se_ratios": [[0.0], [0.0]],
        "stackwise_dw_kernel_sizes": [[0], [0]],
        "stackwise_dw_start_kernel_sizes": [[0], [0]],
        "stackwise_dw_end_kernel_sizes": [[0], [0]],
        "stackwise_exp_kernel_sizes": [[3], [0]],
        "stackwise_pw_kernel_sizes": [[1], [0]],
        "stackwise_num_heads": [[0], [HEADS]],
        "stackwise_key_dims": [[0], [HEAD_DIM]],
        "stackwise_value_dims": [[0], [HEAD_DIM]],
        "stackwise_kv_strides": [[0], [1]],
        "stackwise_use_cpe": [[False], [False]],
        "num_features": 16,
        "use_msfa": False,
        "image_shape": _vit_image(),
    }
    backbone = kh.MobileNetV5Backbone(**args)
    return backbone, make_inputs(backbone)


def _video_prism():
    backbone = kh.VideoPrismBackbone(
        num_frames=2, patch_size=PATCH, hidden_dim=HIDDEN, intermediate_dim=FFN, num_heads=HEADS,
        num_spatial_layers=LAYERS, num_temporal_layers=LAYERS, num_auxiliary_layers=LAYERS,
        vocabulary_size=VOCAB, num_text_layers=LAYERS, image_shape=(16, 16, 3),
    )
    return backbone, make_inputs(backbone)


def _stable_diffusion_3():
    from keras_hub.src.models.clip.clip_text_encoder import CLIPTextEncoder
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    # 32 filters: the VAE's group norms have 32 groups.
    vae = VAEBackbone([32, 32], [1, 1], [32, 32], [1, 1], sampler_method="mode", name="vae")
    clip_l = CLIPTextEncoder(VOCAB, HIDDEN, HIDDEN, LAYERS, HEADS, FFN, "quick_gelu", -1, name="clip_l")
    clip_g = CLIPTextEncoder(VOCAB, HIDDEN, HIDDEN, LAYERS, HEADS, FFN, "gelu", -1, name="clip_g")
    backbone = kh.StableDiffusion3Backbone(
        mmdit_patch_size=2, mmdit_hidden_dim=HIDDEN, mmdit_num_layers=LAYERS, mmdit_num_heads=HEADS,
        mmdit_position_size=16, mmdit_qk_norm=None, mmdit_dual_attention_indices=None, vae=vae,
        clip_l=clip_l, clip_g=clip_g, image_shape=(16, 16, 3),
    )
    return backbone, make_inputs(backbone, num_steps=np.ones((BATCH,), "int32"),
                                 guidance_scale=np.ones((BATCH,), "float32"))


def _flux():
    backbone = kh.FluxBackbone(
        input_channels=HIDDEN, hidden_size=HIDDEN * 2, mlp_ratio=2.0, num_heads=HEADS, depth=1,
        depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10_000, use_bias=True, guidance_embed=True,
        image_shape=(SEQ, HIDDEN), text_shape=(SEQ, HIDDEN), image_ids_shape=(SEQ, 3), text_ids_shape=(SEQ, 3),
        y_shape=(HIDDEN,),
    )
    rng = np.random.default_rng(SEED)
    inputs = {
        "image": rng.standard_normal((BATCH, SEQ, HIDDEN)).astype("float32"),
        "image_ids": np.zeros((BATCH, SEQ, 3), "float32"),
        "text": rng.standard_normal((BATCH, SEQ, HIDDEN)).astype("float32"),
        "text_ids": np.zeros((BATCH, SEQ, 3), "float32"),
        "y": rng.standard_normal((BATCH, HIDDEN)).astype("float32"),
        "timesteps": np.ones((BATCH,), "float32"),
        "guidance": np.ones((BATCH,), "float32"),
    }
    return backbone, inputs


def _simple(factory):
    """A builder for a backbone whose generic inputs (`make_inputs`) are valid."""

    def build():
        backbone = factory()
        return backbone, make_inputs(backbone)

    return build


TINY_BACKBONES = {
    # ---- text encoders
    "AlbertBackbone": _simple(lambda: kh.AlbertBackbone(
        **_text_kwargs(num_heads=HEADS, embedding_dim=HIDDEN, num_groups=1, num_inner_repetitions=1,
                       max_sequence_length=SEQ))),
    "BertBackbone": _simple(lambda: kh.BertBackbone(**_text_kwargs(num_heads=HEADS, max_sequence_length=SEQ))),
    "DebertaV3Backbone": _simple(lambda: kh.DebertaV3Backbone(
        **_text_kwargs(num_heads=HEADS, max_sequence_length=SEQ, bucket_size=4))),
    "DistilBertBackbone": _simple(lambda: kh.DistilBertBackbone(
        **_text_kwargs(num_heads=HEADS, max_sequence_length=SEQ))),
    "ElectraBackbone": _simple(lambda: kh.ElectraBackbone(
        vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, hidden_dim=HIDDEN, embedding_dim=HIDDEN,
        intermediate_dim=FFN, max_sequence_length=SEQ)),
    "ESM2Backbone": _simple(lambda: kh.ESM2Backbone(**_text_kwargs(num_heads=HEADS))),
    "ESMBackbone": _simple(lambda: kh.ESMBackbone(**_text_kwargs(num_heads=HEADS))),
    "RobertaBackbone": _simple(lambda: kh.RobertaBackbone(
        **_text_kwargs(num_heads=HEADS, max_sequence_length=SEQ))),
    "RoformerV2Backbone": _simple(lambda: kh.RoformerV2Backbone(
        **_text_kwargs(num_heads=HEADS, head_size=HEAD_DIM))),
    "XLMRobertaBackbone": _simple(lambda: kh.XLMRobertaBackbone(
        **_text_kwargs(num_heads=HEADS, max_sequence_length=SEQ))),
    "XLNetBackbone": _simple(lambda: kh.XLNetBackbone(**_text_kwargs(num_heads=HEADS))),
    # ---- text decoders
    "BloomBackbone": _simple(lambda: kh.BloomBackbone(**_text_kwargs(num_heads=HEADS))),
    "FalconBackbone": _simple(lambda: kh.FalconBackbone(**_text_kwargs(num_attention_heads=HEADS))),
    "GPT2Backbone": _simple(lambda: kh.GPT2Backbone(**_text_kwargs(num_heads=HEADS, max_sequence_length=SEQ))),
    "GPTNeoXBackbone": _simple(lambda: kh.GPTNeoXBackbone(
        **_text_kwargs(num_heads=HEADS, max_sequence_length=SEQ))),
    "GemmaBackbone": _simple(lambda: kh.GemmaBackbone(**_decoder_kwargs(head_dim=HEAD_DIM))),
    "Gemma3Backbone": _gemma3,
    "Gemma3nBackbone": _gemma3n,
    "Gemma4Backbone": _gemma4,
    "GptOssBackbone": _simple(lambda: kh.GptOssBackbone(
        **_decoder_kwargs(num_experts=2, top_k=1, head_dim=HEAD_DIM, sliding_window=4))),
    "LlamaBackbone": _simple(lambda: kh.LlamaBackbone(**_decoder_kwargs())),
    "Llama3Backbone": _simple(lambda: kh.Llama3Backbone(**_decoder_kwargs())),
    "MistralBackbone": _simple(lambda: kh.MistralBackbone(**_decoder_kwargs(sliding_window=4))),
    "MixtralBackbone": _simple(lambda: kh.MixtralBackbone(
        **_decoder_kwargs(num_experts=2, top_k=1, sliding_window=4))),
    "OPTBackbone": _simple(lambda: kh.OPTBackbone(**_text_kwargs(num_heads=HEADS, max_sequence_length=SEQ))),
    "Phi3Backbone": _simple(lambda: kh.Phi3Backbone(**_decoder_kwargs(max_sequence_length=SEQ))),
    "QwenBackbone": _simple(lambda: kh.QwenBackbone(**_decoder_kwargs())),
    "Qwen2Backbone": _simple(lambda: kh.Qwen2Backbone(**_decoder_kwargs())),
    "Qwen3Backbone": _simple(lambda: kh.Qwen3Backbone(**_decoder_kwargs(head_dim=HEAD_DIM))),
    "Qwen3MoeBackbone": _simple(lambda: kh.Qwen3MoeBackbone(
        **_decoder_kwargs(moe_intermediate_dim=FFN, num_experts=2, head_dim=HEAD_DIM, top_k=1))),
    "Qwen3_5Backbone": _simple(lambda: kh.Qwen3_5Backbone(
        **_decoder_kwargs(head_dim=HEAD_DIM, layer_types=["linear_attention", "full_attention"],
                          linear_num_key_heads=HEADS, linear_num_value_heads=HEADS,
                          linear_key_head_dim=HEAD_DIM, linear_value_head_dim=HEAD_DIM) | {"num_layers": 2})),
    "Qwen3_5MoeBackbone": _simple(lambda: kh.Qwen3_5MoeBackbone(**{
        k: v for k, v in _decoder_kwargs(
            head_dim=HEAD_DIM, moe_intermediate_dim=FFN, shared_expert_intermediate_size=FFN, num_experts=2,
            top_k=1, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=HEADS,
            linear_num_value_heads=HEADS, linear_key_head_dim=HEAD_DIM, linear_value_head_dim=HEAD_DIM,
        ).items() if k != "intermediate_dim"} | {"num_layers": 2})),
    "QwenMoeBackbone": _simple(lambda: kh.QwenMoeBackbone(
        **_decoder_kwargs(moe_intermediate_dim=FFN, shared_expert_intermediate_dim=FFN, num_experts=2, top_k=1))),
    "SmolLM3Backbone": _simple(lambda: kh.SmolLM3Backbone(
        vocabulary_size=VOCAB, hidden_dim=HIDDEN, intermediate_dim=FFN, num_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=1, attention_bias=False, attention_dropout=0.0,
        rope_layer_enabled_list=[True] * LAYERS, layer_types=["attention"] * LAYERS, mlp_bias=False,
        layer_norm_epsilon=1e-6, max_position_embeddings=SEQ, rope_theta=10000.0, partial_rotary_factor=1.0)),
    "SmolLMBackbone": _simple(lambda: kh.SmolLMBackbone(
        vocabulary_size=VOCAB, hidden_dim=HIDDEN, intermediate_dim=FFN, num_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=1, attention_bias=False, attention_dropout=0.0,
        rope_layer_enabled_list=[True] * LAYERS, layer_types=["attention"] * LAYERS, mlp_bias=False,
        layer_norm_epsilon=1e-6, max_position_embeddings=SEQ, rope_theta=10000.0, partial_rotary_factor=1.0)),
    # ---- encoder-decoders
    "BartBackbone": _simple(lambda: kh.BartBackbone(**_text_kwargs(num_heads=HEADS, max_sequence_length=SEQ))),
    "EdRecBackbone": _simple(lambda: kh.EdRecBackbone(
        vocab_size=VOCAB, num_layers_enc=LAYERS, num_layers_dec=LAYERS, hidden_dim=HIDDEN, intermediate_dim=FFN,
        num_heads=HEADS)),
    "T5Backbone": _simple(lambda: kh.T5Backbone(**_text_kwargs(num_heads=HEADS, key_value_dim=HEAD_DIM))),
    "T5GemmaBackbone": _t5gemma(kh.T5GemmaBackbone),
    "T5Gemma2Backbone": _t5gemma(kh.T5Gemma2Backbone),
    # ---- audio
    "MoonshineBackbone": _moonshine,
    "WhisperBackbone": _simple(lambda: kh.WhisperBackbone(
        **_text_kwargs(num_heads=HEADS, num_mels=16, max_encoder_sequence_length=2 * SEQ,
                       max_decoder_sequence_length=SEQ))),
    # ---- vision
    "DeiTBackbone": _simple(lambda: kh.DeiTBackbone(
        image_shape=_vit_image(), patch_size=PATCH, num_layers=LAYERS, num_heads=HEADS, hidden_dim=HIDDEN,
        intermediate_dim=FFN)),
    "DINOV2Backbone": _simple(_dinov2),
    "DINOV3Backbone": _simple(lambda: kh.DINOV3Backbone(
        patch_size=PATCH, num_layers=LAYERS, hidden_dim=HIDDEN, num_heads=HEADS, intermediate_dim=FFN,
        image_shape=_vit_image())),
    "MiTBackbone": _simple(_mit),
    "MobileNetV5Backbone": _mobilenetv5,
    "SegFormerBackbone": _simple(lambda: kh.SegFormerBackbone(image_encoder=_mit(), projection_filters=HIDDEN)),
    "SwinTransformerBackbone": _simple(lambda: kh.SwinTransformerBackbone(
        image_shape=_vit_image(), embed_dim=HIDDEN, depths=[1, 1], num_heads=[HEADS, HEADS], window_size=4,
        patch_size=4, drop_path=0.0)),
    "ViTBackbone": _simple(lambda: kh.ViTBackbone(
        image_shape=_vit_image(), patch_size=PATCH, num_layers=LAYERS, num_heads=HEADS, hidden_dim=HIDDEN,
        mlp_dim=FFN)),
    "ViTDetBackbone": _simple(lambda: kh.ViTDetBackbone(
        image_shape=(16, 16, 3), patch_size=2, hidden_size=HIDDEN, num_layers=2,
        global_attention_layer_indices=[1], intermediate_dim=FFN, num_heads=HEADS, num_output_channels=8,
        window_size=2)),
    "VideoPrismBackbone": _video_prism,
    "DepthAnythingBackbone": _depth_anything,
    "DFineBackbone": _dfine,
    "PARSeqBackbone": _parseq,
    "SAMBackbone": _sam,
    "SAM3PromptableConceptBackbone": _sam3,
    # ---- vision-language and generative
    "BLIP2Backbone": _blip2,
    "CLIPBackbone": _simple(lambda: kh.CLIPBackbone(
        *_clip_pair(kh.CLIPVisionEncoder, kh.CLIPTextEncoder), projection_dim=HIDDEN)),
    "MetaCLIP2Backbone": _simple(lambda: kh.MetaCLIP2Backbone(
        *_clip_pair(kh.MetaCLIP2VisionEncoder, kh.MetaCLIP2TextEncoder), projection_dim=HIDDEN)),
    "SigLIPBackbone": _simple(lambda: kh.SigLIPBackbone(*_clip_pair(kh.SigLIPVisionEncoder, kh.SigLIPTextEncoder))),
    "PaliGemmaBackbone": _pali_gemma,
    "StableDiffusion3Backbone": _stable_diffusion_3,
    "FluxBackbone": _flux,
}


def build_tiny(name: str):
    """`(backbone, inputs)`: the tiny `name` backbone (random weights) and a valid batch for it.

    The backbone has been called once on the batch, so it is built and the
    batch is known to be valid.
    """
    if name not in TINY_BACKBONES:
        hint = f" It has no attention: {NO_ATTENTION[name]}." if name in NO_ATTENTION else ""
        raise ValueError(
            f"`name` must be one of the keys of TINY_BACKBONES.{hint} Received: name={name!r}. "
            f"Known: {', '.join(sorted(TINY_BACKBONES))}"
        )
    keras.utils.set_random_seed(SEED)
    backbone, inputs = TINY_BACKBONES[name]()
    backbone(inputs, training=False)
    return backbone, inputs


# --------------------------------------------------------------- inspection


def _walk(layer, path="", seen=None):
    """(path, layer) of every layer under `layer`, depth first, each layer once.

    Keras has no public recursive walker; `_layers` is the tracked-children
    list that `keras_sara.conversion` walks too. A layer can be reached twice
    (a feature-extractor sub-model built over an encoder's own layers, as in
    DepthAnything and SegFormer): it is yielded at its first path only.
    """
    seen = set() if seen is None else seen
    for child in getattr(layer, "_layers", ()):
        if id(child) in seen:
            continue
        seen.add(id(child))
        child_path = f"{path}/{child.name}" if path else child.name
        yield child_path, child
        yield from _walk(child, child_path, seen)


def _is_attention_class(layer) -> bool:
    name = type(layer).__name__
    return name in INLINE_ATTENTION_CLASSES or ("Attention" in name and name not in NOT_ATTENTION_CLASSES)


def _is_sara(layer) -> bool:
    return type(layer).__module__.split(".")[0] == "keras_sara"


def attention_layers(model) -> list:
    """(path, class name, is keras_sara) of every innermost attention layer of `model`.

    An attention layer is one whose class name contains "Attention" (less
    `NOT_ATTENTION_CLASSES`); innermost: it holds no attention layer itself.
    """
    found = []
    for path, layer in _walk(model):
        if not _is_attention_class(layer):
            continue
        if any(_is_attention_class(sub) for _, sub in _walk(layer)):
            continue
        found.append((path, type(layer).__name__, _is_sara(layer)))
    return found


def _class_counts(names) -> str:
    counts = collections.Counter(names)
    return "; ".join(f"{name} x{n}" for name, n in sorted(counts.items()))


def _outputs(model, inputs) -> list:
    out = model(inputs, training=False)
    return [np.asarray(keras.ops.convert_to_numpy(t), np.float64) for t in keras.tree.flatten(out)]


def _first_line(err: BaseException) -> str:
    """`Type: first line` of an error; for Keras' wrapped call errors, the line that says what went wrong."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(err).__name__
    if len(lines) > 1 and lines[0].startswith("Exception encountered when calling"):
        where = lines[0].removeprefix("Exception encountered when calling ").rstrip(".")
        return f"{type(err).__name__} in {where}: {lines[1][:300]}"
    return f"{type(err).__name__}: {lines[0][:300]}"


def _reload_diff(student, inputs, work: str) -> float:
    """Max abs difference between `student` and its `.keras` reload on `inputs`."""
    path = os.path.join(work, "student.keras")
    student.save(path)
    reloaded = keras.models.load_model(path, compile=False)
    a, b = _outputs(student, inputs), _outputs(reloaded, inputs)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError(f"reloaded outputs have shapes {[y.shape for y in b]}, not {[x.shape for x in a]}")
    return max((float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b)), default=0.0)


# ---------------------------------------------------------------- measuring


def measure(name: str, work: str) -> dict:
    """One row: build `name`, convert it, reload the student; errors are caught and recorded."""
    row = {"backbone": name, "status": "ok", "error": "", "skipped_detail": [], "teacher_attention": [],
           "student_attention": []}
    keras.backend.clear_session()
    start = time.perf_counter()
    try:
        backbone, inputs = build_tiny(name)
    except Exception as e:  # noqa: BLE001  (a builder that fails is a result)
        row.update(status="build failed", error=_first_line(e), total_s=time.perf_counter() - start)
        row["traceback"] = traceback.format_exc(limit=-3)
        return row
    row["build_s"] = time.perf_counter() - start
    row["params"] = int(backbone.count_params())
    teacher = attention_layers(backbone)
    row["teacher_attention"] = [{"path": p, "class_name": c} for p, c, _ in teacher]
    row["attention_layers"] = len(teacher)
    row["attention_classes"] = _class_counts(c for _, c, _ in teacher)

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "nothing converted" is in the report's notes
            student, report = keras_sara.convert(backbone, probe=inputs)
    except Exception as e:  # noqa: BLE001
        row.update(status="convert failed", error=_first_line(e), convert_s=time.perf_counter() - t0,
                   total_s=time.perf_counter() - start)
        row["traceback"] = traceback.format_exc(limit=-3)
        return row
    row["convert_s"] = time.perf_counter() - t0
    row["num_converted"] = report.num_converted
    row["converted_classes"] = _class_counts(c.before for c in report.converted)
    row["converted_detail"] = [{"path": c.path, "before": c.before, "after": c.after} for c in report.converted]
    row["num_skipped"] = len(report.skipped)
    row["skipped_detail"] = [{"path": s.path, "class_name": s.class_name, "reason": s.reason} for s in report.skipped]
    row["skipped"] = " | ".join(f"{s.path} ({s.class_name}): {s.reason}" for s in report.skipped)
    row["relative_error"] = report.relative_error
    row["max_abs_error"] = report.max_abs_error
    row["notes"] = list(report.notes)
    left = attention_layers(student)
    row["student_attention"] = [{"path": p, "class_name": c, "keras_sara": s} for p, c, s in left]
    softmax_left = [c for _, c, s in left if not s]
    row["softmax_left"] = len(softmax_left)
    row["softmax_left_classes"] = _class_counts(softmax_left)
    row["fully_converted"] = report.num_converted > 0 and not softmax_left

    t0 = time.perf_counter()
    try:
        diff = _reload_diff(student, inputs, work)
        row["reload_max_abs_diff"] = diff
        row["reload_ok"] = bool(diff < RELOAD_ATOL)
        if not row["reload_ok"]:
            row["error"] = f"reloaded outputs differ by {diff:.3e} (>= {RELOAD_ATOL:g})"
    except Exception as e:  # noqa: BLE001
        row.update(reload_ok=False, status="reload failed", error=_first_line(e))
        row["traceback"] = traceback.format_exc(limit=-3)
    row["reload_s"] = time.perf_counter() - t0
    row["total_s"] = time.perf_counter() - start
    return row


def summarize(rows: list) -> dict:
    """The summary figures: backbones that convert fully, attention classes seen and converted."""
    built = [r for r in rows if r["status"] != "build failed"]
    with_attention = [r for r in built if r.get("attention_layers")]
    fully = [r["backbone"] for r in with_attention if r.get("fully_converted")]
    seen, converted = set(), set()
    for r in rows:
        seen.update(a["class_name"] for a in r["teacher_attention"])
        converted.update(c["before"] for c in r.get("converted_detail", ()))
    return {
        "backbones": len(rows),
        "built": len(built),
        "build_failed": sorted(r["backbone"] for r in rows if r["status"] == "build failed"),
        "with_attention": len(with_attention),
        "fully_converted": fully,
        "partly_converted": sorted(r["backbone"] for r in with_attention
                                   if r.get("num_converted") and not r.get("fully_converted")),
        "reload_ok": sum(bool(r.get("reload_ok")) for r in built),
        "attention_classes_seen": sorted(seen),
        "attention_classes_converted": sorted(converted & seen),
        "attention_classes_not_converted": sorted(seen - converted),
        "line": (
            f"{len(fully)} of {len(with_attention)} backbones with attention convert fully "
            f"(no softmax attention left); {len(seen)} distinct attention classes seen, "
            f"{len(converted & seen)} of them converted"
        ),
    }


# ------------------------------------------------------------------ writing


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown(rows: list, summary: dict, note: str = "") -> str:
    header = ["backbone", "status", "attention", "converted", "skipped", "softmax left", "rel. error",
              "reload ok", "time (s)", "attention classes", "softmax attention left (classes)", "error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["backbone"], r["status"], r.get("attention_layers"), r.get("num_converted"),
                 r.get("num_skipped"), r.get("softmax_left"), r.get("relative_error"), r.get("reload_ok"),
                 r.get("total_s"), r.get("attention_classes"), r.get("softmax_left_classes"),
                 r.get("error", "").replace("|", "/")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    lines.append(summary["line"] + ".")
    if summary["build_failed"]:
        lines.append(f"Did not build: {', '.join(summary['build_failed'])}.")
    lines.append(f"Attention classes converted: {', '.join(summary['attention_classes_converted']) or 'none'}.")
    lines.append(f"Attention classes not converted: {', '.join(summary['attention_classes_not_converted']) or 'none'}.")
    lines.append("No attention (not run): " + ", ".join(f"{k} ({v})" for k, v in sorted(NO_ATTENTION.items())) + ".")
    if note:
        lines.append(f"Backend note: {note}")
    return "\n".join(lines)


def write_csv(path, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: ("" if r.get(k) is None else f"{r[k]:.6g}" if isinstance(r[k], float) else r[k])
                                 for k in CSV_COLUMNS})

    atomic_write(path, write)


def write_json(path, payload):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.write("\n")

    atomic_write(path, write)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def git_state() -> dict:
    """The commit and whether keras_sara/ has uncommitted changes (the results depend on both)."""
    def git(*argv):
        # GIT_OPTIONAL_LOCKS=0: `git status` does not refresh (write) the index.
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
        out = subprocess.run(["git", *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--", "keras_sara")
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "keras_sara_uncommitted_changes": None}
    return {"git_commit": commit, "keras_sara_uncommitted_changes": None if changes is None else bool(changes)}


def run(names, out_dir: str, backend_note: str = "", command: str = "") -> tuple[list, dict]:
    """Measure `names`, write `coverage.{csv,json,md}` under `out_dir`; `(rows, summary)`."""
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    with work_directory("keras_sara_hub_coverage_") as work:
        for i, name in enumerate(names, 1):
            row = measure(name, work)
            rows.append(row)
            log(f"[{i}/{len(names)}] {name}: {row['status']}, {row.get('num_converted', '-')} converted, "
                f"{row.get('softmax_left', '-')} softmax left, {row.get('total_s', 0):.1f} s"
                + (f" ({row['error']})" if row["error"] else ""))
    summary = summarize(rows)
    payload = {
        "benchmark": "keras_sara.convert coverage of keras-hub backbones",
        "summary": summary,
        "config": {
            "seed": SEED, "batch": BATCH, "seq": SEQ, "vocab": VOCAB, "hidden": HIDDEN, "heads": HEADS,
            "ffn": FFN, "layers": LAYERS, "image": IMAGE, "patch": PATCH, "reload_atol": RELOAD_ATOL,
            "convert": "keras_sara.convert(backbone, probe=inputs) with defaults (feature_map='relu')",
        },
        "no_attention": NO_ATTENTION,
        "machine": {
            "backend": keras.backend.backend(), "backend_note": backend_note, "keras": keras.__version__,
            "keras_hub": keras_hub.__version__, "keras_sara": keras_sara.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            **git_state(),
            "date_utc": started.isoformat(timespec="seconds"),
            "duration_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        },
        "command": command,
        "rows": rows,
    }
    table = markdown(rows, summary, backend_note)
    write_csv(os.path.join(out_dir, "coverage.csv"), rows)
    write_json(os.path.join(out_dir, "coverage.json"), payload)
    write_text(os.path.join(out_dir, "coverage.md"),
               f"{table}\n\nCommand: `{command}` (backend {keras.backend.backend()}).\n")
    return rows, summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated backbone class names (default: all)")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where coverage.{csv,json,md} go")
    p.add_argument("--backend-note", default="", help="free text saved with the results (machine, versions)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(TINY_BACKBONES)
    unknown = [n for n in names if n not in TINY_BACKBONES]
    if unknown:
        no_attention = [n for n in unknown if n in NO_ATTENTION]
        hint = f" {no_attention} have no attention (NO_ATTENTION)." if no_attention else ""
        raise SystemExit(
            f"`--only` must name backbones of TINY_BACKBONES, comma-separated.{hint} Received: "
            f"--only={args.only!r}, unknown {unknown}. Known: {', '.join(sorted(TINY_BACKBONES))}"
        )
    command = shlex.join([sys.executable, "benchmarks/keras_hub_coverage.py"]
                         + (sys.argv[1:] if argv is None else list(argv)))
    log(f"keras-hub coverage: {len(names)} backbones, backend {keras.backend.backend()}, "
        f"keras-hub {keras_hub.__version__}")
    start = time.perf_counter()
    rows, summary = run(names, args.out_dir, args.backend_note, command)
    print(markdown(rows, summary, args.backend_note), flush=True)
    log(f"Wrote coverage.csv, coverage.json, coverage.md under {args.out_dir} "
        f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
