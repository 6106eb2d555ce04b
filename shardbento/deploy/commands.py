"""Deployment subcommands for `python -m shardbento`: bento, k8s, bentocloud, openllm."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from shardbento.catalog import load_spec


def _bento(args: argparse.Namespace) -> int:
    from shardbento.deploy.bento import build_bento

    bento = build_bento(args.model, version=args.version)
    print(bento.tag)
    return 0


def _k8s(args: argparse.Namespace) -> int:
    from shardbento.deploy.k8s import K8sOptions, manifests, to_yaml

    options = K8sOptions(image=args.image, replicas=args.replicas, max_replicas=args.max_replicas)
    _write(to_yaml(manifests(load_spec(args.model), options)), args.output)
    return 0


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

    k8s = subparsers.add_parser("k8s", help="Kubernetes manifests (Deployment, Service, HPA) for a model")
    k8s.add_argument("model")
    k8s.add_argument("--image", default=None, help="container image (default: shardbento-MODEL:latest)")
    k8s.add_argument("--replicas", type=int, default=1)
    k8s.add_argument("--max-replicas", type=int, default=0, help="> replicas adds a HorizontalPodAutoscaler")
    k8s.add_argument("-o", "--output", default=None)
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
