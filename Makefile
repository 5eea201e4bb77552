# The two commands of the README:
#   make demo   a server, a client daemon, messages put, delivered, consumed
#   make test   install what the tests need, then run tests, lint, types, docs
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test install install-run lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# editable_mode=compat: twistd must see twisted/plugins in the source tree.
install-run: $(BIN)/python
	$(BIN)/pip install -q --config-settings editable_mode=compat -e .

install: $(BIN)/python
	$(BIN)/pip install -q --config-settings editable_mode=compat -e '.[test,dev]'

demo: install-run
	$(BIN)/python -m dropr.demo

test: install
	$(BIN)/ruff check dropr tests bench twisted
	$(BIN)/ruff format --check dropr tests bench twisted
	$(BIN)/mypy
	$(BIN)/python -m pytest -q
	$(BIN)/sphinx-build -q -W -b html docs docs/_build/html

bench: install
	$(BIN)/python bench/put.py

clean:
	rm -rf $(VENV) build dist *.egg-info docs/_build .mypy_cache .ruff_cache .pytest_cache
