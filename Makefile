# make demo : set up .venv and run the whole pipeline on the default (tiny) preset, CPU is fine
# make test : set up .venv (with the llamacpp extra: llama-cpp-python builds from source, ~8 min on 2
#             cores, once) and run the test suite; every test that needs an installed package runs
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test setup bench clean chromium

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	touch $(STAMP)

# The test suite's extras: tests/conftest.py's TANDEM_TEST_ALL=1 turns a missing one into a failure
$(TEST_STAMP): $(STAMP)
	$(PIP) -e ".[test,llamacpp]"
	touch $(TEST_STAMP)

# benchmarks/: the test extras plus the peers they measure against (TRL's GRPOTrainer)
$(BENCH_STAMP): $(TEST_STAMP)
	$(PIP) -e ".[test,bench]"
	touch $(BENCH_STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tandem pipeline --preset tiny --out runs/demo

test: $(TEST_STAMP) chromium
	TANDEM_TEST_ALL=1 $(PY) -m pytest tests

# tests/test_web.py drives Debian's chromium (never a downloaded browser); where apt cannot
# install it, that test skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "note: could not install chromium; the browser test will skip"

bench: $(BENCH_STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs
