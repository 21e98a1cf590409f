"""Attention adapters: keras-hub's own attention classes (and yours) converted to SARA in place.

`keras_sara.convert` uses them for every layer whose class (or a base of it)
has an adapter. Built in, when keras-hub is installed:

| keras-hub class | models | file |
|---|---|---|
| `PaliGemmaVitAttention` | PaliGemma's vision tower | `pali_gemma.py` |
| `CachedGemmaAttention` | Gemma, Gemma 2, PaliGemma's decoder | `gemma.py` |
| `LlamaAttention`, `CachedMistralAttention`, `QwenAttention`, `Qwen3Attention`, ... | the Llama family | `llama.py` |
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
from keras_sara.adapters.llama import LLAMA_ADAPTER
from keras_sara.adapters.pali_gemma import PALI_GEMMA_VIT_ADAPTER

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
