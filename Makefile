# Two entry points; each sets up .venv from nothing on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: validate test lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch: the CPU build that lies on this machine's disk (a bare "torch" would pull a CUDA build)
	$(BIN)/pip install --quiet "torch==2.13.0"
	# an install from before the setuptools move left an empty primasim/ here that shadows the sources
	rm -rf $(VENV)/lib/python*/site-packages/primasim
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

validate: $(STAMP)
	$(BIN)/primasim validate

test: $(STAMP)
	$(BIN)/ruff check primasim runtime tests experiments
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check primasim runtime tests experiments

clean:
	rm -rf $(VENV) .pytest_cache
