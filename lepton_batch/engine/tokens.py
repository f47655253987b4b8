"""The model's tokenizer without transformers: its ``tokenizer.json`` through the
tokenizers library, cut at ``max_length`` the way the engine cuts rows.

Importable without torch or transformers. The driver counts a sample's tokens with it
(``plan.py``), and a worker tokenizes its first shard with it while the warm-up still
imports the model stack (:meth:`~lepton_batch.engine.EngineCache.pretokenize`). The engine
uses those ids only when its own tokenizer serialises identically (:class:`Pretokenized`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lepton_batch.engine.batching import Tokenized

if TYPE_CHECKING:
    from tokenizers import Tokenizer

PRETOKENIZE_ROWS = 2048  # rows per call while the warm-up runs: it is checked between calls


def truncating(tokenizer: Tokenizer, max_length: int, side: str = "right") -> Tokenizer:
    """``tokenizer`` set to cut each row at ``max_length`` tokens, special tokens kept, in
    the encoding pass itself (``side``: which end is cut), and never to pad."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length, direction=side)
    return tokenizer


def file_tokenizer(model_dir: Path, max_length: int) -> Tokenizer | None:
    """``model_dir/tokenizer.json`` cutting rows at ``max_length``, from the side that
    ``tokenizer_config.json`` names (``truncation_side``, default right); None when the
    model has no ``tokenizer.json`` (a slow tokenizer only)."""
    file = model_dir / "tokenizer.json"
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    side = "right"
    config = model_dir / "tokenizer_config.json"
    # Unreadable: the engine's own tokenizer decides; a mismatch only forgoes early ids.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if config.is_file():
            side = json.loads(config.read_text()).get("truncation_side") or "right"
    return truncating(Tokenizer.from_file(str(file)), max_length, side)


@dataclass(frozen=True)
class Pretokenized:
    """The ids of a shard's leading ``len(tokens)`` rows, and the tokenizer that made them
    (its full serialisation: vocabulary, normaliser, special tokens, truncation)."""

    tokenizer: str
    tokens: Tokenized

    def __len__(self) -> int:
        return len(self.tokens)
