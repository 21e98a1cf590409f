"""Export of a keras-hub model converted through an adapter: PaliGemma's vision tower to LiteRT."""

import keras
import numpy as np

import keras_sara
from keras_sara.export import export_tflite
from tests.adapters.test_keras_hub_adapters import paligemma


def test_paligemma_vision_tower_exports_builtins_only_and_verified(tmp_path):
    backbone, inputs = paligemma()
    # the paper's RT-2 move: only the ViT's attention becomes SARA
    student, report = keras_sara.convert(
        backbone, layers=lambda layer, path: "Vit" in type(layer).__name__, probe=inputs)
    assert report.num_converted == 2
    assert {c.before for c in report.converted} == {"PaliGemmaVitAttention"}
    assert {s.class_name for s in report.skipped} == {"CachedGemmaAttention"}
    images = keras.Input((16, 16, 3), name="images")
    tower = keras.Model(images, student.vit_encoder(images))
    path = tmp_path / "vit.tflite"
    result = export_tflite(tower, str(path), probe=inputs["images"])
    assert path.exists() and result.verified and result.relative_error <= 1e-4
    assert result.flex_ops == []
    assert "SOFTMAX" not in result.op_histogram  # linear only
    # the same tower before conversion does compute a softmax
    teacher_tower = keras.Model(images, backbone.vit_encoder(images))
    teacher = export_tflite(teacher_tower, str(tmp_path / "teacher.tflite"), probe=inputs["images"])
    assert teacher.op_histogram.get("SOFTMAX", 0) == 2
    np.testing.assert_allclose(
        np.asarray(tower(inputs["images"])), np.asarray(student.vit_encoder(inputs["images"])), rtol=1e-6)
