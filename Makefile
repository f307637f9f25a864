# sfjax — the two commands of the README, plus helpers. Every target is idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HASH   := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# `make demo` installs the package alone; `make test` adds the test / ns3 extras (torch, TRL,
# PEFT ...). Each stamp names the pyproject it was installed from, so an edit reinstalls.
BASE_STAMP := $(VENV)/.installed-base-$(HASH)
STAMP  := $(VENV)/.installed-all-$(HASH)
RUN_DIR ?= runs/demo
# `make test` runs the suite in PYTEST_WORKERS pytest-xdist processes (tests handed out one at a
# time as workers free up): while one compiles or waits on a subprocess the other works.
# PYTEST_WORKERS=0 runs it in this process (for --pdb, or to see what tests print).
PYTEST_WORKERS ?= 2

.PHONY: test demo lint install bench clean help

help:
	@echo "make demo   - set up .venv and run the self-finetuning smoke experiment"
	@echo "make test   - set up .venv (with test extras) and run the test suite"
	@echo "make lint   - ruff over the code"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(BASE_STAMP): $(PY) pyproject.toml
	$(PIP) install -q -e .
	rm -f $(VENV)/.installed-base-*
	touch $(BASE_STAMP)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q -e '.[test,ns3]'
	rm -f $(VENV)/.installed-*
	touch $(BASE_STAMP) $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check sfjax tests experiments benchmarks
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check sfjax tests experiments benchmarks

demo: $(BASE_STAMP)
	@if [ -f experiments/sf_ranslicing.py ]; then \
		$(PY) experiments/sf_ranslicing.py smoke --run-dir $(RUN_DIR); \
	else \
		echo "The self-finetuning experiment (experiments/sf_ranslicing.py) is not available yet."; \
	fi

clean:
	rm -rf $(VENV) runs .pytest_cache

# ns-3 scenario (ns3/ran_slicing.cc) against the system ns-3: `make ns3-deps` installs the
# Debian/Ubuntu packages, `make ns3` builds ns3/build/ran_slicing (the env also builds on use).
.PHONY: ns3 ns3-deps
ns3-deps:
	bash ns3/install_deps.sh

ns3:
	bash ns3/build.sh
