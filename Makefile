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

.PHONY: demo test setup lint bench hardening asan stubs clean wheel-cpu wheel-cuda sdist

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

# The long hardening runs of the README's table (docs/hardening.md): about 15 minutes.
hardening: setup
	$(PY) benchmarks/fuzz_loader.py --cases 3000
	$(PY) benchmarks/bench_schemas.py
	$(PY) benchmarks/soak.py

# The test suite's C++-heavy files under AddressSanitizer. The first build of the sanitized
# llama.cpp takes about 40 minutes on 2 cores (cached like the default build).
ASAN_TESTS ?= tests/test_generation.py tests/test_pool.py tests/test_safety.py tests/test_state.py \
	tests/test_stress.py tests/test_template_limits.py tests/test_fuzz_loader.py \
	tests/test_properties.py tests/test_properties_tokenizer.py tests/test_properties_grammar.py \
	tests/test_chat.py tests/test_schema_validation.py
asan: setup
	python="$$($(PY) scripts/build_sanitized.py --print-python)" && \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0 "$$python" -m pytest -p no:cacheprovider $(ASAN_TESTS)

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
