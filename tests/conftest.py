"""Shared pytest configuration: report the backend, fix seeds."""

import os

import keras
import numpy as np
import pytest

from keras_sara.utils import full_float32_matmuls


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()} (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')})"


@pytest.fixture(autouse=True)
def _seed_and_policy():
    np.random.seed(0)
    keras.utils.set_random_seed(0)
    policy = keras.config.dtype_policy()
    # The tests hold float32 maths to float32 tolerances; on recent NVIDIA GPUs
    # JAX and TensorFlow would run float32 matmuls in TF32 (~1e-3 relative,
    # measured on an H100: benchmarks/results/gpu/README.md). No-op on CPUs.
    with full_float32_matmuls():
        yield
    keras.config.set_dtype_policy(policy)
