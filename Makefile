# One-command entry points. `make test` and `make demo` set everything up on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install test test-fast demo benchmark gpu-kit gpu-check clean deploy-check

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	bash tools/install_deps.sh $(PY)

test: install
	$(PY) -m pytest -q tests

test-fast: install   # the fast tier: everything but the end-to-end and multi-process tests
	$(PY) -m pytest -q -m "not slow" tests

demo: install
	$(PY) tools/demo.py

benchmark: install
	$(PY) tools/benchmark.py

gpu-kit: $(PY)   # where there is network: what the offline GPU machine lacks, in .whl/gpu_kit
	PY=$(PY) bash tools/gpu_kit.sh

# On a CUDA GPU machine: installs from .whl/gpu_kit (offline) unless the mm stack is there, builds
# mmcv's CUDA ops, then CUDA tests (sync-debug check first), reparameterize, benchmark table.
gpu-check:
	PY=$(if $(wildcard $(PY)),$(PY),python3) bash tools/gpu_check.sh

deploy-check:   # after make demo: its models through mmdeploy 1.3.1 and ONNX Runtime
	PYTHON=$(PYTHON) bash tools/mmdeploy_check.sh

clean:
	rm -rf $(VENV) .venv-mmdeploy work_dirs data/demo build orepa_mm/_kxk_kernel_ops*.so
