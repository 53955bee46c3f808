# The two commands of the README. Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: book test quick-book

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
