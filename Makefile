# `make demo` runs the main job, `make test` runs every check. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean
export NO_MKDOCS_2_WARNING := 1

demo: $(STAMP)
	$(BIN)/pocketbatch demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q
	$(BIN)/python examples/run_all.py
	$(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

$(STAMP): pyproject.toml plugins/openai/pyproject.toml plugins/anthropic/pyproject.toml plugins/gemini/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e plugins/openai -e plugins/anthropic -e plugins/gemini
	touch $@

clean:
	rm -rf $(VENV) site
