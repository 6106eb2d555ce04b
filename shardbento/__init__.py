"""shardbento: serve chat and vision language models sharded across GPUs, packaged as Bentos."""

__version__ = "0.1.0"  # pyproject.toml's; a test keeps them equal
