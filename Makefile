# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv when missing and
# install the pinned set (constraints.txt); re-running is fast because installation is stamped.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ovtasks-installed
TEST_OUT ?= test-output
PYTEST_ARGS ?=

.PHONY: demo test test-slow bench lock clean browser reliability fuzz

# The browser test needs Debian's chromium + chromium-driver; installed here when absent (root or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
	  || echo "WARNING: could not install chromium/chromium-driver; the browser test will skip with this reason"; }

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=python3.x)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and by pip: the CPU machine keeps torch/torchvision wheels on local disk.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/ovtasks demo

# pytest's exit code lands in $(TEST_OUT)/pytest-exit-code so .ci/run can tell "no tests ran" (5).
test: $(STAMP) browser
	@mkdir -p $(TEST_OUT)
	@HF_HUB_OFFLINE=1 $(BIN)/python -m pytest --junitxml=$(TEST_OUT)/junit.xml $(PYTEST_ARGS); \
	  rc=$$?; echo $$rc > $(TEST_OUT)/pytest-exit-code; exit $$rc

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# the structure-aware fuzzers (LAION shards into ingest; pseudo-label shards into the gate and the loader; image files
# into predict) for longer than the default suite runs them (FUZZ_EXAMPLES=30 there)
fuzz: $(STAMP)
	HF_HUB_OFFLINE=1 FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-2000} $(BIN)/python -m pytest -q -p no:logging tests/unit/ingest/test_fuzz_ingest.py \
	  tests/unit/validate/test_fuzz_gate.py $(PYTEST_ARGS)

# the fault-injection and security tests, written up as benchmarks/reliability.md (--slow: + the 1k vs 10k memory test)
reliability: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/reliability.py $(RELIABILITY_ARGS)

# every performance benchmark side by side -> benchmarks/results.{json,md} and the README table (~25 min on 2 cores)
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

lock: $(BIN)/python
	{ echo "# Tested set, Python 3.11 / x86_64 (pip freeze of the make-test venv). Regenerate: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -vi '^ovtasks'; } > constraints.txt

clean:
	rm -rf $(VENV) $(TEST_OUT) .pytest_cache
