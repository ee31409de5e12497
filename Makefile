# clip-triton: every target creates and uses its own virtualenv in $(VENV).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= build
MODEL ?= ShapesCLIP-RN-T
PYTEST_ARGS ?=

PERF_ENV ?= .venv-perf
.PHONY: install perf-tools demo test test-slow test-gpu lint bench bench-quick clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -e ".[dev]"
	# Type stubs only (their tensorrt dependency is not installable here).
	$(BIN)/pip install -q --no-deps "tensorrt-stubs>=10.12"
	touch $(STAMP)

install: $(STAMP)

## NVIDIA's perf_analyzer (from the tritonclient 2.51.0 wheel) in its own virtualenv: never touches the project's.
$(PERF_ENV)/.installed: $(STAMP) benchmarks/perf_analyzer.py
	$(BIN)/python -m benchmarks.perf_analyzer install --env $(PERF_ENV)
	touch $@

perf-tools: $(PERF_ENV)/.installed

## Build + serve the trained ShapesCLIP-RN-T (builtin weights; MODEL=ViT-B-32 etc.: random weights, offline),
## run parity with accuracy, rank a held-out image's captions over gRPC beside PyTorch.
demo: install
	$(BIN)/clip-triton demo --model $(MODEL) --out $(OUT)/demo

TRT_STUBS := $(OUT)/trt-stubs
MYPY_NS := $(OUT)/mypy-ns
lint: install
	$(BIN)/ruff check clip_triton exporter clients model_repository benchmarks tests
	# mypy checks the clip_triton namespace (exporter/ and clients/), the TensorRT code against tensorrt-stubs.
	# The 10.13 stubs have two syntax errors (parameters named `in`, a required parameter after defaulted
	# ones) and no py.typed, so mypy is pointed at a patched copy; without it mypy would silently treat
	# tensorrt as untyped.
	rm -rf $(TRT_STUBS) && mkdir -p $(TRT_STUBS)
	site=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  cp -r $$site/tensorrt $$site/tensorrt_bindings $(TRT_STUBS)/
	sed -i -E 's/, in: /, in_: /; s/channel_axis: int\)/channel_axis: int = ...)/' \
	  $(TRT_STUBS)/tensorrt_bindings/tensorrt.pyi
	# mypy cannot follow pyproject's package-dir: it reads the namespace through a tree of links.
	rm -rf $(MYPY_NS) && mkdir -p $(MYPY_NS)/clip_triton
	cp clip_triton/__init__.py $(MYPY_NS)/clip_triton/
	ln -s $(CURDIR)/exporter $(CURDIR)/clients $(MYPY_NS)/clip_triton/
	cd $(MYPY_NS) && MYPYPATH=$(abspath $(TRT_STUBS)) $(abspath $(BIN))/mypy --config-file $(CURDIR)/pyproject.toml \
	  --follow-imports=silent -p clip_triton

## The README's test command: lint, then every tier but `slow` (gpu/tensorrt tests skip without hardware),
## on TEST_WORKERS xdist workers (a test file stays on one worker: its module fixtures are built once).
TEST_WORKERS ?= 2
test: lint perf-tools
	$(BIN)/pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: install
	$(BIN)/pytest -m "slow" $(PYTEST_ARGS)

test-gpu: install
	$(BIN)/pytest -m "gpu or tensorrt" $(PYTEST_ARGS)

bench: install perf-tools
	$(BIN)/python -m benchmarks.run --out benchmarks

bench-quick: install perf-tools
	$(BIN)/python -m benchmarks.run --quick --out $(OUT)/bench-quick

clean:
	rm -rf $(OUT)
