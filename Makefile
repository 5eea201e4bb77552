# The two commands of the README:
#   make demo   a server, a client daemon, messages put, delivered, consumed
#   make test   install what the tests need, then run tests, lint, types, docs
# and, while working:
#   make test-fast   the fast tier only (pytest -m "not slow"): under a minute
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test test-fast install install-run browser php postgresql lint docs bench sidebyside clean

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

# tests/test_statuspage.py loads the server's status page in headless
# Chromium (Debian's package); as root, install it when it is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else \
		echo "chromium is missing (apt-get install chromium): the status page test will fail"; \
	fi

# tests/test_putsocket_examples.py runs docs/examples/put.php; as root,
# install php-cli (Debian's package) when it is missing.
php:
	@command -v php >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q php-cli; \
	else \
		echo "php is missing (apt-get install php-cli): the PHP example's test is skipped"; \
	fi

# The PostgreSQL store's tests start a cluster of their own (initdb, pg_ctl)
# and put HAProxy in front of several servers: Debian's packages, installed
# as root when missing.
PG_BINDIR ?= /usr/lib/postgresql/15/bin
postgresql:
	@if [ -x $(PG_BINDIR)/initdb ] && command -v haproxy >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql haproxy; \
	else \
		echo "postgresql or haproxy is missing (apt-get install postgresql haproxy): their tests are skipped"; \
	fi

# Both tiers: the fast one first, so a plain mistake shows in a minute, then
# the slow one (processes, chaos, crash loops, the browser, PostgreSQL).
test: install browser php postgresql
	$(BIN)/ruff check dropr tests bench twisted
	$(BIN)/ruff format --check dropr tests bench twisted
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -m "not slow"
	$(BIN)/python -m pytest -q -m slow
	$(BIN)/sphinx-build -q -W -b html docs docs/_build/html

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/put.py

# dropr, dropr at 5d1f997, RabbitMQ and a naive pipeline side by side (as
# root it installs rabbitmq-server; see bench/sidebyside.py).
sidebyside: install
	$(BIN)/python bench/sidebyside.py

clean:
	rm -rf $(VENV) build dist *.egg-info docs/_build .mypy_cache .ruff_cache .pytest_cache
