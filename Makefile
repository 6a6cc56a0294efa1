# The README's two commands: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.synced

.PHONY: demo test lint install down browser

$(STAMP): pyproject.toml uv.lock
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv
	$(PYTHON) -m uv sync --frozen --extra test
	@touch $(STAMP)

install: $(STAMP)

## Command 1: the whole local stack on embedded defaults, a first champion, and its status.
demo: $(STAMP)
	$(VENV)/bin/visionloop demo

## Command 2: lint, the layers contract, then the whole test suite (it starts and stops the
## servers it needs itself). The dashboard's browser test drives Debian's headless Chromium.
test: lint browser
	$(VENV)/bin/python -m pytest

## Ruff's rules and format, and the import-linter contract (pyproject.toml) that keeps each
## package to the layers below it.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

browser:
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

down: $(STAMP)
	$(VENV)/bin/visionloop down
