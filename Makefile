# One-command set-up: `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow install clean gpu-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 is the CPU build that lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,keras,onnx,openvino,dask,dicom,bundle,pacs]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/covidctnet demo

# `make test` stays under 10 minutes on 2 cores; tests marked slow (the full-series backend exactness check, several
# minutes) run in `make test-slow`, which CI runs as well.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

# On a machine with an NVIDIA GPU: every CUDA path against the CPU, a few minutes (without CUDA it says so, exit 0).
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info
