"""Device maps and the GPU-count check that runs before any weight is read."""

from __future__ import annotations

import pytest
import torch

from shardbento.catalog import load_spec
from shardbento.engine.hf.placement import PlacementError, _mapped_device, device_map_for


def test_placement_cpu_spec_maps_to_cpu() -> None:
    assert device_map_for(load_spec("tiny-llama"), "unused", torch.float32) == "cpu"


def test_placement_missing_gpus_fail_with_numbers_and_fix() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    spec = load_spec("llama-3.1-70b-instruct")
    with pytest.raises(PlacementError) as info:
        device_map_for(spec, spec.source, torch.bfloat16)
    message = str(info.value)
    assert f"gpus: {spec.gpus}" in message
    assert "sees 0 GPU(s)" in message
    assert "CUDA_VISIBLE_DEVICES" in message


def test_placement_manual_map_wins() -> None:
    spec = load_spec("tiny-llama").model_copy(update={"device_map": {"": "cpu"}})
    assert device_map_for(spec, "unused", torch.float32) == {"": "cpu"}


@pytest.mark.parametrize(
    ("device_map", "module", "expected"),
    [
        ({"model.embed_tokens": 1, "model.layers": 2}, "model.embed_tokens", torch.device("cuda", 1)),
        ({"model": 0, "lm_head": 3}, "model.embed_tokens", torch.device("cuda", 0)),
        ({"": "cpu"}, "model.embed_tokens", torch.device("cpu")),
        ({"model.embed_tokens": "disk"}, "model.embed_tokens", None),
        ({"lm_head": 0}, "model.embed_tokens", None),
    ],
)
def test_placement_mapped_device_longest_prefix(device_map, module, expected) -> None:
    assert _mapped_device(device_map, module) == expected
