# Two entry points for a fresh clone: `make run` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := .venv.lock
# setuptools' build backend warns, in a box, once per editable package: information only, nothing to act on.
EDITABLE_QUIET := PYTHONWARNINGS="$${PYTHONWARNINGS:+$$PYTHONWARNINGS,}ignore:Editable installation"

.PHONY: run test bench sim clean

# The set-up runs under a lock, so `make run` and `make test` started together install once: the second waits,
# then finds the stamp fresh. The stamp is written only when every step succeeded; without one (a first run,
# a failed or interrupted one) the venv is built again from empty.
ifndef SIDECARD_SETUP_LOCKED
$(STAMP): pyproject.toml clients/python/pyproject.toml
	flock $(LOCK) $(MAKE) --no-print-directory SIDECARD_SETUP_LOCKED=1 $(STAMP)
else
$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(if $(wildcard $(STAMP)),$(VENV),--clear $(VENV))
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(EDITABLE_QUIET) $(BIN)/python -m pip install --quiet -e '.[dev]' -e clients/python
	touch $@
endif

# Real upstream when ANTHROPIC_API_KEY is set, the built-in simulated upstream otherwise.
run: $(STAMP)
	$(BIN)/sidecard serve $(if $(ANTHROPIC_API_KEY),,--simulate) $(ARGS)

test: $(STAMP) store-server
	$(BIN)/python tests/run.py $(ARGS)

# The fleet tests' real redis-server, installed when missing, under the set-up's lock (`make run` needs no store).
.PHONY: store-server
store-server:
	@flock $(LOCK) sh .ci/store-server

sim: $(STAMP)
	$(BIN)/sidecard sim --port 8787

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) $(LOCK) build *.egg-info
