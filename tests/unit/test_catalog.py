"""Catalog files validate, bad files fail with the file, the field and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardbento.catalog import CATALOG_DIR, CatalogError, list_names, load_spec, load_spec_file, select_spec


@pytest.mark.parametrize("path", sorted(CATALOG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_catalog_every_entry_validates(path: Path) -> None:
    spec = load_spec_file(path)
    assert spec.name == path.stem
    assert spec.max_model_len >= spec.generation.max_tokens or spec.max_model_len >= 16


def test_catalog_resources_follow_gpus() -> None:
    for name in list_names():
        spec = load_spec(name)
        resources = spec.resources()
        if spec.num_gpus == 0:  # CPU specs (gpus: 0, or CPU tensor-parallel ranks) reserve no GPU
            assert "gpu" not in resources
            assert spec.world_size == max(spec.gpus, 1)
        else:
            assert resources["gpu"] == spec.gpus
            assert resources.get("gpu_type") == spec.gpu_type


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_catalog_bad_literal_names_file_field_and_allowed(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad", "source: x\nkind: text\nparallel: diagonal\n")
    with pytest.raises(CatalogError) as info:
        load_spec_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "'parallel'" in message
    assert "'layers'" in message and "'tensor'" in message


def test_catalog_vllm_quantization_is_a_method_of_the_pinned_vllm(tmp_path: Path) -> None:
    """vLLM 0.32 has no bitsandbytes method (its startup would refuse it): the catalog says so and where
    bitsandbytes is; its own methods pass."""
    path = _write(tmp_path, "bnb", "source: x\nkind: text\nvllm:\n  quantization: bitsandbytes\n")
    with pytest.raises(CatalogError, match="vllm.quantization 'bitsandbytes'.*quantization: int4 or int8"):
        load_spec_file(path)
    for method in ("fp8", "awq", "int8_per_channel_weight_only"):
        path = _write(tmp_path, "ok", f"source: x\nkind: text\nvllm:\n  quantization: {method}\n")
        assert load_spec_file(path).vllm.quantization == method


def test_catalog_unknown_field_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "typo", "source: x\nkind: text\ngpu: 2\n")
    with pytest.raises(CatalogError, match="field 'gpu'.*Extra inputs"):
        load_spec_file(path)


def test_catalog_negative_gpus_rejected(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="field 'gpus'"):
        load_spec_file(_write(tmp_path, "neg", "source: x\nkind: text\ngpus: -1\n"))


def test_catalog_unknown_gpu_type_lists_allowed(tmp_path: Path) -> None:
    path = _write(tmp_path, "gt", "source: x\nkind: text\ngpus: 1\ngpu_type: rtx-9999\n")
    with pytest.raises(CatalogError, match="nvidia-a100-80gb"):
        load_spec_file(path)


def test_catalog_invalid_yaml_names_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "broken", "source: [unclosed\n")
    with pytest.raises(CatalogError, match="broken.yaml: not valid YAML"):
        load_spec_file(path)


def test_catalog_name_must_match_stem(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="file stem"):
        load_spec_file(_write(tmp_path, "one", "name: two\nsource: x\nkind: text\n"))


def test_catalog_unknown_model_lists_known() -> None:
    with pytest.raises(CatalogError, match="tiny-llama"):
        load_spec("no-such-model")


def test_catalog_select_spec_env_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDBENTO_MODEL", "tiny-llava")
    assert select_spec(None).name == "tiny-llava"
    assert select_spec("tiny-llama").name == "tiny-llama"
    monkeypatch.delenv("SHARDBENTO_MODEL")
    assert select_spec(None).name == "tiny-llama"
