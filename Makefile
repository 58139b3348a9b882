# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned here, before the requirements: on a CPU-only machine with a local wheel this takes the
# CPU build; on a CUDA machine PyPI's torch==2.13.0 is the CUDA build. TORCH_SPEC overrides it.
TORCH_SPEC ?= torch==2.13.0
MODEL ?= THUDM/CogVideoX-2b

.PHONY: demo test install install-dev lint browser-deps clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Then the package itself, editable: `import cogvideox` works from any folder and follows this checkout. Built
# with the venv's own setuptools (--no-build-isolation), so this step downloads nothing; -qq hides setuptools'
# generic notice about editable installs.
EDITABLE := $(PIP) install -qq --no-build-isolation -e .

install: $(VENV)/bin/python
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements.txt "setuptools>=77"
	$(EDITABLE)

install-dev: $(VENV)/bin/python
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements-dev.txt "setuptools>=77"
	$(EDITABLE)

demo: install
	$(PY) app.py --model $(MODEL)

# Debian's chromium for the browser test; skipped (with a note) where apt-get is unavailable or not root.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core fonts-noto-color-emoji >/dev/null) ; } || \
	  echo "note: chromium not installed; the browser test will be skipped"

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two workers, a test file each at a time: much of the suite waits on servers and subprocesses, so two files
# at once fit this 2-core machine (~6 min instead of ~8).
test: install-dev browser-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) outputs test-artifacts .pytest_cache .ruff_cache
