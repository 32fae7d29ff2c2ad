# Two commands for a fresh clone:
#   make demo   set up .venv (pinned packages) and run the pipeline on the embedded default
#   make test   run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/snakemake --cores $(CORES)

test: setup
	$(BIN)/pytest

# Style (ruff format and check, snakefmt; settings in pyproject.toml) and Snakemake's own
# best-practice checks.
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile rules/
	$(BIN)/snakemake --lint

# The embedded default's outputs only, as Snakemake knows them: results/demo/'s and those of the
# data folders it reads (a run sharing them makes them again). Other runs and files of yours stay.
clean:
	$(BIN)/snakemake --cores 1 --delete-all-output
