"""Deployment subcommands for `python -m shardbento`: bento, k8s, bentocloud, openllm."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from shardbento.catalog import load_spec


def _bento(args: argparse.Namespace) -> int:
    from shardbento.deploy.bento import build_bento

    bento = build_bento(args.model, version=args.version)
    print(bento.tag)
    return 0


def _k8s(args: argparse.Namespace) -> int:
    from shardbento.deploy.k8s import K8sOptions, manifests, to_yaml, validate
    from shardbento.deploy.keda import KedaOptions

    if args.check:
        for path in args.check:
            _check_manifests(path, args.crd, validate)
        return 0
    if not args.model:
        raise SystemExit("k8s: give a MODEL, or --check FILE")
    try:
        keda = None
        if args.prometheus_url:
            keda = KedaOptions(
                prometheus_url=args.prometheus_url,
                waiting_per_replica=args.target_waiting,
                running_fraction=args.target_running_fraction,
                polling_interval_s=args.polling_interval_s,
                scale_down_window_s=args.scale_down_window_s,
                namespace=args.namespace,
            )
        options = K8sOptions(
            image=args.image,
            replicas=args.replicas,
            max_replicas=args.max_replicas,
            autoscaler=args.autoscaler,
            keda=keda,
            scrape=args.scrape,
            namespace=args.namespace,
        )
        objects = manifests(load_spec(args.model), options)
    except ValueError as exc:
        raise SystemExit(f"k8s: {exc}") from None
    _write(to_yaml(objects), args.output)
    return 0


def _check_manifests(path: str, crd_files: list[str], validate: Any) -> None:
    """One manifest file's objects against Kubernetes' schemas and the given CRDs, or exit naming why."""
    import jsonschema

    objects = [o for o in yaml.safe_load_all(Path(path).read_text()) if o]
    try:
        validate(objects, crd_files=crd_files)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path)
        raise SystemExit(f"{path}: {where}: {exc.message}") from None
    except Exception as exc:  # kubernetes_validate's own errors carry only `.message`
        raise SystemExit(f"{path}: {getattr(exc, 'message', None) or exc}") from None
    print(f"{path}: valid ({', '.join(o['kind'] for o in objects)})")


def _bentocloud(args: argparse.Namespace) -> int:
    from shardbento.deploy.bentocloud import deployment_config, to_yaml, validate

    if args.check:
        for path in args.check:
            validate(yaml.safe_load(Path(path).read_text()))
            print(f"{path}: valid BentoCloud deployment config")
        return 0
    if not args.model:
        raise SystemExit("bentocloud: give a MODEL, or --check FILE")
    _write(to_yaml(deployment_config(load_spec(args.model), bento=args.bento)), args.output)
    return 0


def _openllm(args: argparse.Namespace) -> int:
    from shardbento.deploy.openllm import export_repo

    print(export_repo(args.tags, Path(args.output)))
    return 0


def _write(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)


def register(subparsers: argparse._SubParsersAction) -> None:
    bento = subparsers.add_parser("bento", help="build the Bento shardbento-MODEL for a catalog model")
    bento.add_argument("model")
    bento.add_argument("--version", default=None, help="Bento version (default: generated)")
    bento.set_defaults(handler=_bento)

    k8s = subparsers.add_parser(
        "k8s", help="Kubernetes manifests (Deployment, Service, autoscaler) for a model"
    )
    _k8s_arguments(k8s)
    k8s.set_defaults(handler=_k8s)

    cloud = subparsers.add_parser("bentocloud", help="a `bentoml deploy -f` config for a model")
    cloud.add_argument("model", nargs="?")
    cloud.add_argument("--check", nargs="+", metavar="FILE", help="validate existing config files instead")
    cloud.add_argument("--bento", default=None, help="Bento tag (default: shardbento-MODEL:latest)")
    cloud.add_argument("-o", "--output", default=None)
    cloud.set_defaults(handler=_bentocloud)

    openllm = subparsers.add_parser("openllm", help="export built Bentos as an OpenLLM model repository")
    openllm.add_argument("output", help="the repository folder to create or update")
    openllm.add_argument("tags", nargs="+", help="Bento tags in the local store")
    openllm.set_defaults(handler=_openllm)


def _k8s_arguments(k8s: argparse.ArgumentParser) -> None:
    k8s.add_argument("model", nargs="?")
    k8s.add_argument("--image", default=None, help="container image (default: shardbento-MODEL:latest)")
    k8s.add_argument("--replicas", type=int, default=1)
    k8s.add_argument("--max-replicas", type=int, default=0, help="> replicas adds an autoscaler")
    k8s.add_argument(
        "--autoscaler",
        choices=["keda", "cpu"],
        default="keda",
        help="keda: a KEDA ScaledObject on the request queue (default); cpu: an HPA on CPU utilisation",
    )
    keda = k8s.add_argument_group("KEDA (--autoscaler keda)")
    keda.add_argument(
        "--prometheus-url",
        default=None,
        help="the Prometheus KEDA queries, e.g. http://prometheus-operated.monitoring.svc:9090 (required)",
    )
    keda.add_argument("--target-waiting", type=float, default=5.0, help="waiting requests per replica")
    keda.add_argument(
        "--target-running-fraction",
        type=float,
        default=0.8,
        help="running requests per replica / max_num_seqs",
    )
    keda.add_argument("--polling-interval-s", type=int, default=15)
    keda.add_argument("--scale-down-window-s", type=int, default=300)
    k8s.add_argument(
        "--scrape",
        choices=["annotations", "service-monitor"],
        default="annotations",
        help="how Prometheus finds /metrics: prometheus.io/* pod annotations, or a ServiceMonitor",
    )
    k8s.add_argument("--namespace", default=None, help="set on every object and in the KEDA queries")
    k8s.add_argument("-o", "--output", default=None)
    k8s.add_argument("--check", nargs="+", metavar="FILE", help="validate manifest files instead")
    k8s.add_argument("--crd", action="append", default=[], help="a CRD file to validate its kind (repeat)")
