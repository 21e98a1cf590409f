# make demo / make test each build .venv from scratch if it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# tests that must pass on every backend (ops, feature maps, layers)
MULTIBACKEND_TESTS := tests/ops tests/layers tests/adapters tests/test_feature_maps.py tests/conversion tests/test_callbacks.py tests/test_pct_policy.py tests/test_streaming.py tests/test_streaming_custom_blocks.py tests/test_utils.py
# pytest-xdist workers for the TensorFlow and JAX suites (their tests are mostly single-threaded
# graph building and compiling: 2 workers on 2 cores took TensorFlow's 21 minutes to 14)
TEST_WORKERS ?= 2

# Real images for the up-training example and its test (Debian's package; no download at run time)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv data test test-tensorflow test-jax test-torch test-distributed test-properties demo bench clean

venv: $(STAMP)

data: $(FASHION_MNIST)

$(FASHION_MNIST):
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[jax,torch,dev,hub,grasping]"
	$(PY) -m pip install --quiet --no-deps keras-hub==0.32.0
	touch $(STAMP)

test: test-tensorflow test-jax test-torch test-distributed

test-tensorflow: $(STAMP) data
	KERAS_BACKEND=tensorflow $(PY) -m pytest -q -n $(TEST_WORKERS) tests

test-jax: $(STAMP)
	# tests compile many small programs once each: cheap XLA passes halve the time
	KERAS_BACKEND=jax XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true" \
		$(PY) -m pytest -q -n $(TEST_WORKERS) $(MULTIBACKEND_TESTS)

test-torch: $(STAMP)
	KERAS_BACKEND=torch $(PY) -m pytest -q $(MULTIBACKEND_TESTS)

test-distributed: $(STAMP)
	# 8 host devices for DataParallel and a (2, 4) ModelParallel mesh on one CPU
	KERAS_BACKEND=jax XLA_FLAGS="--xla_force_host_platform_device_count=8" \
		$(PY) -m pytest -q tests/test_distribution.py

# the property tests (tests/ops/test_properties.py) with many more examples than make test draws
test-properties: $(STAMP)
	SARA_PROPERTY_EXAMPLES=300 KERAS_BACKEND=tensorflow $(PY) -m pytest -q -n $(TEST_WORKERS) tests/ops/test_properties.py

demo: $(STAMP) data
	KERAS_BACKEND=tensorflow $(PY) examples/quickstart.py
	KERAS_BACKEND=tensorflow $(PY) examples/uptrain_vit.py --quick --out-dir examples/results/uptrain_vit_quick
	KERAS_BACKEND=tensorflow $(PY) benchmarks/scaling.py --quick --out-dir benchmarks/results/quick
	KERAS_BACKEND=tensorflow $(PY) examples/pct_grasping.py --quick
	KERAS_BACKEND=tensorflow $(PY) examples/rt2_grasping.py --quick

bench: $(STAMP)
	KERAS_BACKEND=tensorflow $(PY) benchmarks/scaling.py

clean:
	rm -rf $(VENV) .pytest_cache
