# One-command entry points. `make test` and `make demo` set everything up on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install test test-fast demo benchmark gpu-check clean

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

gpu-check: install   # on a machine with a CUDA GPU: CUDA tests, reparameterize, benchmark table
	PY=$(PY) bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) work_dirs data/demo build orepa_mm/_kxk_kernel_ops*.so
