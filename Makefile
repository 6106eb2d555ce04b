# shardbento: `make serve` serves the default model, `make test` runs lint and the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= tiny-llama
PORT ?= 3000
STAMP := $(VENV)/.installed-$(shell cat env/cpu.txt env/dev.txt | cksum | cut -d' ' -f1)

.PHONY: setup serve test lint format unit clean

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

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
