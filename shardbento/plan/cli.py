"""`python -m shardbento plan MODEL`: the memory budget, mode and per-GPU layout, offline."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from shardbento.catalog import CatalogError, load_spec
from shardbento.plan.engines import catalog_choice
from shardbento.plan.memory import BENTO_GPU_KINDS, PlanError, load_config, model_shape, parse_gpus
from shardbento.plan.preflight import check_loader
from shardbento.plan.sharding import plan_spec, render
from shardbento.plan.source import config_path


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("plan", help="how a catalog model fits on GPUs (offline, no weights)")
    parser.add_argument("model", help="catalog name (models/NAME.yaml)")
    parser.add_argument(
        "--gpus", help="e.g. 4xA100-80GB or H100-80GB (default: the spec's gpus and gpu_type)"
    )
    parser.add_argument("--max-model-len", type=int, help="context window to budget the KV cache for")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=run)


def _tp_capable(config: dict[str, Any]) -> bool:
    try:
        from shardbento.plan.tp_plan import tp_plan_available
    except ImportError:  # no transformers on this machine: judge by the heads alone
        return True
    return tp_plan_available(config)


def _loader_note(spec: Any, config: dict[str, Any], engine: str) -> str:
    """How the checkpoint loads, or why the transformers engine cannot load it (the memory plan still
    holds for another engine, so it is printed all the same; startup refuses such an entry)."""
    try:
        return check_loader(spec, config, engine)
    except PlanError as exc:
        return f"transformers engine: {exc}"


def _notes(spec: Any, config: dict[str, Any], engine: str, reason: str) -> tuple[str, ...]:
    """Why this engine, how it loads the checkpoint, and for vLLM how the transformers engine would (what
    `auto` falls back to if vLLM refuses the model at startup)."""
    notes = (reason, _loader_note(spec, config, engine))
    if engine == "vllm" and spec.engine == "auto":
        notes += (f"if vLLM refuses it at startup, {_loader_note(spec, config, 'transformers')}",)
    return notes


def run(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.model)
        count, gpu = parse_gpus(args.gpus or BENTO_GPU_KINDS.get(spec.gpu_type or "", "A100-80GB"))
        config = load_config(config_path(spec))
        engine = catalog_choice(spec)
        plan = plan_spec(
            spec,
            model_shape(config),
            gpu,
            num_gpus=count,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            tp_capable=engine.name == "vllm" or _tp_capable(config),
            notes=_notes(spec, config, engine.name, engine.reason),
            engine=engine.name,
        )
    except (CatalogError, PlanError) as exc:
        if args.json:
            print(json.dumps({"error": str(exc)}))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_json(), indent=2) if args.json else render(plan))
    return 0
