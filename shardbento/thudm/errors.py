"""The THUDM conversion's typed errors."""

from __future__ import annotations


class TokenizerFormatError(ValueError):
    """tokenizer.model is not what its format promises, or uses an option the conversion does not reproduce."""
