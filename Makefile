# The two commands of the README:
#   make demo   set everything up, then generate text with the default model
#   make test   set up whatever is missing, then run the test suite
# Both are idempotent; the slow steps (llama.cpp build, model assembly) are cached in
# ~/.cache/llama-cpp-nanobind (override with LLAMA_CPP_NANOBIND_CACHE).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL := models/gemma-3-270m-q4_k_m.gguf
INSTALLED := $(VENV)/.installed
PROMPT ?= The three primary colors are

.PHONY: demo test setup lint bench stubs clean wheel-cpu wheel-cuda sdist

demo: setup
	$(PY) -m llama_cpp generate -m $(MODEL) --temperature 0 -n 64 "$(PROMPT)"

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

setup: $(PY)
	$(PY) scripts/setup_llama.py
	@$(MAKE) --no-print-directory $(INSTALLED)
	$(PY) scripts/fetch_model.py

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip

# Rebuilt when the binding, the build files or llama.cpp's build change. The packages of
# requirements-nodeps.txt require llama-cpp-python, which would shadow `llama_cpp`: they
# go in without their dependencies (the rest of what they need is in `.[dev]`).
$(INSTALLED): lib/llama-build.json pyproject.toml requirements-nodeps.txt CMakeLists.txt src/bindings/llama_cpp.cpp
	$(PY) -m pip install -q --disable-pip-version-check "scikit-build-core>=0.10" "nanobind>=2.4"
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[dev]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/bench_decode.py
	$(PY) benchmarks/bench_api.py
	$(PY) benchmarks/bench_pool.py
	$(PY) benchmarks/bench_server.py
	$(PY) benchmarks/bench_experts.py
	$(PY) benchmarks/bench_cluster.py

clean:
	rm -rf build .venv lib include models dist

# Release artifacts in dist/ (docs/RELEASING.md). Long builds, never part of `make test`:
# the portable CPU llama.cpp (all CPU variants) and, for wheel-cuda, the CUDA module
# (35-50 minutes per architecture on 2 cores). Both cached like the default build.
wheel-cpu wheel-cuda sdist: setup
	nice -n 19 $(PY) scripts/build_wheels.py $(patsubst wheel-%,%,$@)

# Regenerate the committed type stub of the extension after changing the binding.
stubs: setup
	$(PY) -m nanobind.stubgen -q -m llama_cpp._core -o src/llama_cpp/_core.pyi
