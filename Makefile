# Two entry points; each sets up .venv from nothing on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNELS := $(VENV)/.kernels
KERNEL_SRC := setup.py $(wildcard runtime/kernels/*.cc runtime/kernels/*.h)

.PHONY: validate test lint clean

$(STAMP): pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch: the CPU build that lies on this machine's disk (a bare "torch" would pull a CUDA build)
	$(BIN)/pip install --quiet "torch==2.13.0"
	# an install from before the setuptools move left an empty primasim/ here that shadows the sources
	rm -rf $(VENV)/lib/python*/site-packages/primasim
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP) $(KERNELS)

# the compiled kernels (runtime/kernels/*.cc): an editable install does not rebuild them when
# their sources change, so this does, in place
$(KERNELS): $(STAMP) $(KERNEL_SRC)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(KERNELS)

validate: $(KERNELS)
	$(BIN)/primasim validate

test: $(KERNELS)
	$(BIN)/ruff check primasim runtime tests experiments
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check primasim runtime tests experiments

clean:
	rm -rf $(VENV) .pytest_cache build runtime/kernels/_qk*.so
