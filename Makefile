# Two commands from a fresh clone: `make test` and `make demo`.
# The venv is rebuilt whenever pyproject.toml changes, so CI always sees a missing install step.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint typecheck pytest chromium promtool schemas clean

# The commit checked out, where git keeps it loose: the install is editable, and its
# version (msmt --version, msmt_build_info) is the commit's at install time, so a new
# commit installs again (a new user's trial: a pulled tree still named the old build).
HEAD_REF := $(wildcard .git/HEAD $(addprefix .git/,$(shell git symbolic-ref -q HEAD 2>/dev/null)))

# umask 022: under a umask of 000 the venv, and code every msmt command runs, would be
# writable by every local user (a review; msmt node run refuses such code folders).
$(STAMP): pyproject.toml $(HEAD_REF)
	umask 022 && $(PYTHON) -m venv $(VENV)
	umask 022 && $(BIN)/python -m pip install --quiet --upgrade pip
	umask 022 && $(BIN)/python -m pip install --quiet -e '.[test]'
	chmod -R o-w .  # a clone made under umask 000: msmt refuses code others may change
	# Its cache folders made now, 0755: a first run under umask 000 made them 0777, and
	# broker/__init__ and broker/entry run before msmt can check anything.
	umask 022 && env -u PYTHONPYCACHEPREFIX $(BIN)/python -m compileall -q broker
	umask 022 && touch $(STAMP)

install: $(STAMP)

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Three workers: the five-minute soak, the integration suite in order, and the light
# integration modules; the pure modules fill in wherever a worker is free
# (tests/conftest.py, SoakBesideSuite).
# Bytecode is cached under the venv, not in the tree, even where the environment
# sets PYTHONDONTWRITEBYTECODE (a CI image's may): else each of the hundreds of msmt
# processes the suite starts (nodes, their planning workers, commands) compiled the
# broker from source again: half a second of each node's start on a slow machine.
pytest: $(STAMP) chromium promtool
	umask 022 && env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX='$(CURDIR)/$(VENV)/pycache' $(BIN)/pytest -n 3

# The browser test (tests/test_demo.py) needs Debian's chromium: installed only if missing,
# so that `make test` alone works on a fresh machine (.ci/run runs only that).
chromium:
	scripts/install-debian.sh /usr/bin/chromium chromium

# promtool checks and unit-tests the shipped alert rules (tests/test_alerts.py): Debian's
# prometheus package, installed only if missing, as chromium is.
promtool:
	scripts/install-debian.sh /usr/bin/promtool prometheus

demo: $(STAMP)
	umask 022 && $(BIN)/msmt demo

schemas: $(STAMP)
	$(BIN)/msmt schemas export --out schemas

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
