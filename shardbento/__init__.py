"""shardbento: serve chat and vision language models sharded across GPUs, packaged as Bentos."""
