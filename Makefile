# The README's two commands: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.synced

.PHONY: demo test install down browser

$(STAMP): pyproject.toml uv.lock
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv
	$(PYTHON) -m uv sync --frozen --extra test
	@touch $(STAMP)

install: $(STAMP)

## Command 1: the whole local stack on embedded defaults, a first champion, and its status.
demo: $(STAMP)
	$(VENV)/bin/visionloop demo

## Command 2: the whole test suite (it starts and stops the servers it needs itself).
## The dashboard's browser test drives Debian's headless Chromium.
test: $(STAMP) browser
	$(VENV)/bin/python -m pytest

browser:
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

down: $(STAMP)
	$(VENV)/bin/visionloop down
