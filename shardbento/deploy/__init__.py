"""Packaging and deployment: Bentos, images, Kubernetes manifests, BentoCloud configs, OpenLLM repos."""
