# shardbento: `make serve` serves the default model, `make test` runs lint and the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= tiny-llama
PORT ?= 3000
STAMP := $(VENV)/.installed-$(shell cat env/cpu.txt env/dev.txt | cksum | cut -d' ' -f1)

.PHONY: setup serve test lint format unit clean browser

$(STAMP): env/cpu.txt env/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r env/dev.txt
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

serve: setup
	$(BIN)/bentoml serve service:ShardBento --port $(PORT) --arg model=$(MODEL)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

unit: setup
	$(BIN)/python -m pytest tests/unit -q

# Debian's Chromium for the playground's browser tests (tests/e2e/test_ui_*.py); they skip without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	} || echo "warning: could not install chromium; the playground browser tests will be skipped"

test: lint browser
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
