"""Attention adapters: keras-hub's own attention classes (and yours) converted to SARA in place.

`keras_sara.convert` uses them for every layer whose class (or a base of it)
has an adapter. Built in, when keras-hub is installed:

| keras-hub class | models | file |
|---|---|---|
| `PaliGemmaVitAttention`, `Gemma3VisionAttention` | PaliGemma's and Gemma 3's vision towers | `pali_gemma.py` |
| `CachedGemmaAttention` | Gemma, Gemma 2, PaliGemma's decoder | `gemma.py` |
| `CachedGemma3Attention` | Gemma 3's decoder, EmbeddingGemma | `gemma3.py` |
| `LlamaAttention`, `CachedMistralAttention`, `QwenAttention`, `Qwen3Attention`, `Qwen3MoeAttention`, `CachedMixtralAttention`, `Phi3Attention`, `QwenMoeAttention` | the Llama family | `llama.py` |
| `SmolLM3Attention` | SmolLM3 | `smollm3.py` |
| `CachedMultiHeadAttention` (and `WhisperCachedMultiHeadAttention`) | GPT-2, OPT, BART, Whisper, every `TransformerDecoder` | `cached_mha.py` |

Add your own with `register_attention(cls, AttentionAdapter(mixin, ...))`
(see its docstring for a complete example).
"""

from __future__ import annotations

import importlib
import sys

from keras_sara.adapters import base as _base

from keras_sara.adapters.base import (
    ADAPTED_NAME,
    AdaptedAttention,
    AttentionAdapter,
    adapt_in_place,
    adapted_class,
    adapter_for,
    looks_like_attention,
    overridden_base,
    register_attention,
    registered_classes,
)
from keras_sara.adapters.cached_mha import CACHED_MHA_ADAPTER
from keras_sara.adapters.gemma import GEMMA_ADAPTER
from keras_sara.adapters.gemma3 import GEMMA3_ADAPTER
from keras_sara.adapters.llama import LLAMA_ADAPTER, MIXTRAL_ADAPTER, PHI3_ADAPTER, QWEN_MOE_ADAPTER
from keras_sara.adapters.pali_gemma import PALI_GEMMA_VIT_ADAPTER
from keras_sara.adapters.smollm3 import SMOLLM3_ADAPTER

__all__ = [
    "ADAPTED_NAME",
    "AdaptedAttention",
    "AttentionAdapter",
    "adapt_in_place",
    "adapted_class",
    "adapter_for",
    "looks_like_attention",
    "overridden_base",
    "register_attention",
    "registered_classes",
]

# (module, class name, adapter): registered when keras-hub imports; a class
# missing from the installed keras-hub is simply not registered.
_KERAS_HUB = (
    ("keras_hub.src.models.pali_gemma.pali_gemma_vit", "PaliGemmaVitAttention", PALI_GEMMA_VIT_ADAPTER),
    ("keras_hub.src.models.gemma.gemma_attention", "CachedGemmaAttention", GEMMA_ADAPTER),
    ("keras_hub.src.models.llama.llama_attention", "LlamaAttention", LLAMA_ADAPTER),
    ("keras_hub.src.models.mistral.mistral_attention", "CachedMistralAttention", LLAMA_ADAPTER),
    ("keras_hub.src.models.qwen.qwen_attention", "QwenAttention", LLAMA_ADAPTER),
    ("keras_hub.src.models.qwen3.qwen3_attention", "Qwen3Attention", LLAMA_ADAPTER),
    ("keras_hub.src.models.qwen3_moe.qwen3_moe_attention", "Qwen3MoeAttention", LLAMA_ADAPTER),
    ("keras_hub.src.models.mixtral.mixtral_attention", "CachedMixtralAttention", MIXTRAL_ADAPTER),
    ("keras_hub.src.models.phi3.phi3_attention", "Phi3Attention", PHI3_ADAPTER),
    ("keras_hub.src.models.qwen_moe.qwen_moe_attention", "QwenMoeAttention", QWEN_MOE_ADAPTER),
    ("keras_hub.src.models.smollm3.smollm3_layers", "SmolLM3Attention", SMOLLM3_ADAPTER),
    ("keras_hub.src.models.gemma3.gemma3_attention", "CachedGemma3Attention", GEMMA3_ADAPTER),
    ("keras_hub.src.models.gemma3.gemma3_vision_encoder", "Gemma3VisionAttention", PALI_GEMMA_VIT_ADAPTER),
    ("keras_hub.src.layers.modeling.cached_multi_head_attention", "CachedMultiHeadAttention", CACHED_MHA_ADAPTER),
)


def _register_keras_hub() -> bool:
    """Register the built-in adapters once keras-hub is imported (never imports it itself)."""
    if "keras_hub" not in sys.modules:
        return False
    for module, name, adapter in _KERAS_HUB:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if cls not in _base._ADAPTERS:
            register_attention(cls, adapter)
    return True


_base._BUILTIN_HOOKS.append(_register_keras_hub)
