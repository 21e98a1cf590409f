"""Tiny keras-hub CausalLMs built from their constructors (random weights, nothing downloaded)."""

import keras_hub

V = 64  # vocabulary


def gpt2(max_sequence_length=32):
    bb = keras_hub.models.GPT2Backbone(vocabulary_size=V, num_layers=2, num_heads=2, hidden_dim=16,
                                       intermediate_dim=32, max_sequence_length=max_sequence_length)
    return keras_hub.models.GPT2CausalLM(backbone=bb, preprocessor=None)


def gemma():
    bb = keras_hub.models.GemmaBackbone(vocabulary_size=V, num_layers=2, num_query_heads=4, num_key_value_heads=2,
                                        hidden_dim=16, intermediate_dim=32, head_dim=8)
    return keras_hub.models.GemmaCausalLM(backbone=bb, preprocessor=None)


def llama():
    bb = keras_hub.models.LlamaBackbone(vocabulary_size=V, num_layers=2, num_query_heads=4, num_key_value_heads=2,
                                        hidden_dim=16, intermediate_dim=32)
    return keras_hub.models.LlamaCausalLM(backbone=bb, preprocessor=None)


def paligemma():
    bb = keras_hub.models.PaliGemmaBackbone(
        vocabulary_size=V, image_size=16, num_layers=2, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32, head_dim=8, vit_patch_size=4, vit_num_heads=2,
        vit_hidden_dim=16, vit_num_layers=1, vit_intermediate_dim=32)
    return keras_hub.models.PaliGemmaCausalLM(backbone=bb, preprocessor=None)
