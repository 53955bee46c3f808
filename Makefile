# The commands of the README. Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: book test quick-book lab

# Reinstall when the package's requirements change.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Run every chapter of the book, headless, on the embedded default; figures land in figures/.
book: $(STAMP)
	$(PY) -m minimind_v.book

# The same chapters with tiny sizes: the whole book in minutes.
quick-book: $(STAMP)
	MINIMIND_V_QUICK=1 $(PY) -m minimind_v.book

test: $(STAMP)
	$(PY) -m pytest

# JupyterLab on the book: a double-click opens a chapter as a notebook, and the "Python 3" kernel
# is this environment's python (see jupyter/lab.sh). More options: make lab LAB_ARGS="--port 8899".
lab: $(STAMP)
	sh jupyter/lab.sh $(PY) $(LAB_ARGS)
