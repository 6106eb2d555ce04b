"""What a model's Bento carries: labels, the image (CPU or CUDA), hub weights, and the build itself."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from shardbento.catalog import ModelSpec, catalog_dir
from shardbento.lora import LoraSource

if TYPE_CHECKING:
    from bentoml import Bento
    from bentoml.images import Image
    from bentoml.models import HuggingFaceModel

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent.parent
BENTOFILE = REPO / "bentofile.yaml"
# The top-level entries a build context needs (bentofile.yaml then picks the files that go in).
STAGED = ("bentofile.yaml", "README.md", "service.py", "shardbento", "models", "env", "pyproject.toml")
PYTHON_VERSION = "3.11"
# CPU images install the pinned CPU set; CUDA images the committed lock of the engine they run
# (`make cuda-lock`): env/cuda.txt for the transformers engine, env/vllm-cuda.txt for vLLM.
CPU_REQUIREMENTS = "env/cpu.txt"
CUDA_REQUIREMENTS = "env/cuda.lock.txt"
VLLM_CUDA_REQUIREMENTS = "env/vllm-cuda.lock.txt"
# Llama repositories also ship the original consolidated checkpoints; transformers never reads them.
HUB_EXCLUDE = ["original/*", "*.pth", "*.gguf"]


def bento_name(spec: ModelSpec) -> str:
    return f"shardbento-{spec.name}"


def spec_digest(spec: ModelSpec) -> str:
    """12 hex digits that change whenever the model's catalog entry changes."""
    data = spec.model_dump_json(exclude={"description"}).encode()
    return hashlib.sha256(data).hexdigest()[:12]


def bento_labels(spec: ModelSpec) -> dict[str, str]:
    """Labels written into bento.yaml; every value is a string, as BentoML requires."""
    labels = {
        "model": spec.name,
        "kind": spec.kind,
        "source": spec.source,
        "revision": spec.revision,
        "gpus": str(spec.gpus),
        "engine": spec.engine,
        "spec_digest": spec_digest(spec),
    }
    if spec.gpu_type:
        labels["gpu_type"] = spec.gpu_type
    return labels


def service_envs(spec: ModelSpec) -> list[dict[str, str]]:
    """Environment variables the service declares to BentoML: HF_TOKEN for a gated hub repository
    (BentoCloud then asks for it at deploy time; the weights download reads it)."""
    return [{"name": "HF_TOKEN"}] if spec.gated and is_hub_source(spec) else []


def is_hub_source(spec: ModelSpec) -> bool:
    """A hub id (`org/name`), as opposed to a generated recipe or a local directory."""
    if spec.is_generated or spec.source.startswith(("/", ".", "~")):
        return False
    return spec.source.count("/") == 1 and not Path(spec.source).exists()


def hub_weights(spec: ModelSpec) -> HuggingFaceModel | None:
    """The BentoML declaration of a hub model's weights (baked into the Bento and its image); None otherwise.

    Declaring does not download: BentoML resolves it at build time and when the service first reads it.
    """
    if not is_hub_source(spec):
        return None
    from bentoml.models import HuggingFaceModel

    return HuggingFaceModel(spec.source, revision=spec.revision, exclude=HUB_EXCLUDE)


def hub_adapters(spec: ModelSpec) -> dict[str, HuggingFaceModel]:
    """The entry's hub LoRA adapters declared the BentoML way (class attributes `lora_<i>`, in name
    order), so a Bento and its image carry them as they carry the base weights."""
    from bentoml.models import HuggingFaceModel

    return {
        f"lora_{i}": HuggingFaceModel(source.source, revision=source.revision)
        for i, (_, source) in enumerate(sorted(spec.lora_adapters.items()))
        if source.is_hub
    }


def local_spec(spec: ModelSpec, service: object) -> ModelSpec:
    """The spec with hub weights and hub adapters replaced by BentoML's copies of them (downloaded on
    first read), as `service` (the ShardBento instance) resolves its declared models."""
    update: dict[str, object] = {}
    if is_hub_source(spec):
        update["source"] = str(service.weights)  # type: ignore[attr-defined]
    adapters = dict(spec.lora_adapters)
    for i, (name, source) in enumerate(sorted(spec.lora_adapters.items())):
        if source.is_hub:
            adapters[name] = LoraSource(source=str(getattr(service, f"lora_{i}")))
    return spec.model_copy(update={**update, "lora_adapters": adapters}) if update or adapters else spec


def stage_local_adapters(spec: ModelSpec, context: Path) -> None:
    """Copy an entry's local adapter directories into the staged catalog (models/adapters/NAME) and
    point its staged YAML at them, so the Bento carries them."""
    import yaml

    local = {
        n: s for n, s in spec.lora_adapters.items() if not s.is_hub and not s.source.startswith("generated:")
    }
    if not local:
        return
    entry = context / "models" / f"{spec.name}.yaml"
    data = yaml.safe_load(entry.read_text())
    for name, source in local.items():
        target = Path("adapters") / name.replace("/", "--")
        path = Path(source.source).expanduser()
        shutil.copytree(path if path.is_absolute() else catalog_dir() / path, context / "models" / target)
        data["lora_adapters"][name] = str(target)
    entry.write_text(yaml.safe_dump(data, sort_keys=False))


class ImageError(ValueError):
    """A catalog entry whose image cannot carry the engine it names."""


def requirements_file(spec: ModelSpec) -> str:
    """The requirement set of the entry's image: the engine it will run where it is deployed (`auto`
    decided from the catalog, shardbento.engine.selection) on CPU or CUDA."""
    from shardbento.plan.engines import catalog_choice

    engine = catalog_choice(spec).name
    if spec.num_gpus == 0:
        if engine == "vllm":
            raise ImageError(
                f"model {spec.name!r}: engine: vllm on CPU is for tests (make test-vllm); CPU images run "
                "the transformers engine: set engine: auto or transformers, or gpus >= 1"
            )
        return CPU_REQUIREMENTS
    lock = VLLM_CUDA_REQUIREMENTS if engine == "vllm" else CUDA_REQUIREMENTS
    _check_gpu_type(spec, lock)
    return lock


def _check_gpu_type(spec: ModelSpec, lock: str) -> None:
    """A declared GPU kind the lock's CUDA build has no kernels for is refused by name at build time."""
    from shardbento.plan.cuda import capability_refusal, lock_cuda
    from shardbento.plan.memory import BENTO_GPU_KINDS, GPU_KINDS

    kind = GPU_KINDS.get(BENTO_GPU_KINDS.get(spec.gpu_type or "", ""))
    refusal = kind and capability_refusal(str(spec.gpu_type), kind[1], lock_cuda(REPO / lock))
    if refusal:
        raise ImageError(f"model {spec.name!r}: {refusal}")


def image_for(spec: ModelSpec) -> Image | None:
    """Python 3.11 on Debian; CPU models get the pinned CPU set, GPU models the locked CUDA set of the
    engine they run (vLLM's, or the transformers engine's). None for `engine: vllm` on CPU: no image
    carries it, but `bentoml serve` from a checkout runs it (the vLLM tests); build_bento refuses it.

    BentoML's own locking stays off: it would resolve torch against PyPI (the CUDA build) for CPU images
    too, and the CUDA set is locked already.
    """
    from bentoml.images import Image

    try:
        requirements = requirements_file(spec)
    except ImageError:
        if spec.num_gpus:
            raise
        return None
    image = Image(python_version=PYTHON_VERSION, lock_python_packages=False)
    # BentoML adds its own `bentoml==<running version>` line; a second one would be a double requirement.
    pins = [r for r in read_requirements(REPO / requirements) if not r.startswith("bentoml==")]
    return image.python_packages(*pins)


def read_requirements(path: Path) -> list[str]:
    """Requirement lines of a pip file, comments dropped (read here: BentoML rejects absolute paths)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def build_bento(name: str, version: str | None = None) -> Bento:
    """`bentoml build --arg model=NAME` for one catalog model, saved as shardbento-NAME:VERSION."""
    import bentoml

    from shardbento.catalog import load_spec

    spec = load_spec(name, catalog_dir())
    requirements_file(spec)  # an entry no image can carry is refused here, by name
    with tempfile.TemporaryDirectory(prefix="shardbento-build-") as context:
        _stage(Path(context))
        stage_local_adapters(spec, Path(context))
        bento = bentoml.bentos.build_bentofile(
            str(Path(context) / BENTOFILE.name),
            name=bento_name(spec),
            version=version,
            build_ctx=context,
            args={"model": spec.name},
        )
    logger.info("built %s (%s)", bento.tag, bento.path)
    return bento


def _stage(context: Path) -> None:
    """Copy what a Bento may include into a clean build context.

    BentoML walks the whole context before filtering it with bentofile.yaml, venvs included: slow, and
    it fails when another process changes a venv under it. The catalog staged is the one the build reads
    ($SHARDBENTO_CATALOG when set), so the Bento serves the entry it was built from.
    """
    for name in STAGED:
        source = catalog_dir() if name == "models" else REPO / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, context / name)
