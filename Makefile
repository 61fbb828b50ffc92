# The two commands the README promises: `make demo` and `make test`.
# Both install what they need into .venv on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test unit newest-python backends clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# What the tests need (Prefect, pytest, ...), and what the demo needs. An
# editable install makes setuptools warn about folders named like the
# package, whatever the layout: pip's output is shown only when it fails.
PIP_INSTALL = $(PY) -m pip install --quiet --disable-pip-version-check
$(VENV)/.installed: pyproject.toml $(VENV)/bin/python
	@echo "installing otel-bridge and what its tests need into $(VENV) ..."
	@$(PIP_INSTALL) -e '.[test]' > $(VENV)/pip-install.log 2>&1 || { cat $(VENV)/pip-install.log; exit 1; }
	@touch $@

$(VENV)/.demo-installed: pyproject.toml $(VENV)/bin/python
	@echo "installing otel-bridge and what its demo needs into $(VENV) ..."
	@$(PIP_INSTALL) -e '.[demo]' > $(VENV)/pip-install.log 2>&1 || { cat $(VENV)/pip-install.log; exit 1; }
	@touch $@

# The embedded default: a real local Prefect server, the bundled example
# flow, and its trace as a tree on the terminal and as OTLP/JSON in a file.
demo: $(VENV)/.demo-installed
	$(VENV)/bin/otel-bridge demo

# The whole test suite, real Prefect server and real backends included,
# and the unit tests on the newest Python too.
test: $(VENV)/.installed backends newest-python
	$(PY) -m pytest

# Everything that needs no Prefect server, backend or service process: about
# a minute, for the edit-test loop. (`make test` runs these too.)
unit: $(VENV)/.installed
	$(PY) -m pytest -m "not integration"

# The unit tests on the newest Python the package supports, when this machine
# has it (pyenv's, or on the PATH); said plainly when it does not.
PYTHON_NEWEST ?= $(shell for p in $(HOME)/.pyenv/versions/3.13*/bin/python python3.13; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null && { echo $$p; break; }; done)
NEWEST_VENV := .venv-newest

newest-python:
	@set -e; if [ -z "$(PYTHON_NEWEST)" ]; then \
	  echo "newest-python: no Python 3.13 here: the unit tests ran on one Python only"; \
	else \
	  [ -x $(NEWEST_VENV)/bin/python ] || $(PYTHON_NEWEST) -m venv $(NEWEST_VENV); \
	  $(NEWEST_VENV)/bin/python -m pip install --quiet --upgrade pip; \
	  $(NEWEST_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' \
	    > $(NEWEST_VENV)/pip-install.log 2>&1 || { cat $(NEWEST_VENV)/pip-install.log; exit 1; }; \
	  $(NEWEST_VENV)/bin/python -m pytest -q -m "not integration" -p no:cacheprovider; \
	fi

# Jaeger, the OpenTelemetry Collector, Prometheus and VictoriaLogs, built from
# source at pinned versions into a cache outside the repo. Not Grafana Tempo: it is AGPL-3.0 (the tests
# check collector-config/tempo.yaml and our output against its limits instead).
backends:
	scripts/build-backends.sh

clean:
	rm -rf $(VENV) $(NEWEST_VENV) .pytest_cache .hypothesis
