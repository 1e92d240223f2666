# Two entry points for a fresh clone: `make run` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench sim clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e clients/python
	touch $@

# Real upstream when ANTHROPIC_API_KEY is set, the built-in simulated upstream otherwise.
run: $(STAMP)
	$(BIN)/sidecard serve $(if $(ANTHROPIC_API_KEY),,--simulate) $(ARGS)

test: $(STAMP)
	$(BIN)/python tests/run.py $(ARGS)

sim: $(STAMP)
	$(BIN)/sidecard sim --port 8787

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
