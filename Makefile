# One command sets up and runs the main job, one sets up and passes the tests (see README).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup demo test test-fast test-apache bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/chainfold demo

# scripts/ensure-chromium installs Debian's chromium (as root) for the HTML report's browser tests;
# without it those tests skip and say why.
test: setup
	-scripts/ensure-chromium >/dev/null
	$(BIN)/pytest -q
	scripts/test-apache

test-fast: setup
	-scripts/ensure-chromium >/dev/null
	$(BIN)/pytest -q -m "not slow"

test-apache: setup
	scripts/test-apache

bench: setup
	$(BIN)/chainfold bench

clean:
	rm -rf $(VENV) .chainfold .pytest_cache .hypothesis test-artifacts
