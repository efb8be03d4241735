# `make demo` runs the main job, `make test` runs every check. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean redis-server
export NO_MKDOCS_2_WARNING := 1

demo: $(STAMP)
	$(BIN)/pocketbatch demo

test: $(STAMP) lint redis-server
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

# The shared-limit tests start a real redis-server (conftest.py); install Debian's when missing.
redis-server:
	@command -v redis-server >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null; fi; }

clean:
	rm -rf $(VENV) site
