"""The Pixtral tokenizer: mistral-common's `tekken_240911.json`, shipped inside the mistral-common wheel."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import mistral_common
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

TOKENIZER_FILE = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"

BOS_ID, EOS_ID = 1, 2
IMG_ID, IMG_BREAK_ID, IMG_END_ID = 10, 12, 13


_LOADING = threading.Lock()


def load_tokenizer() -> MistralTokenizer:
    """A process-wide tokenizer; equal to MistralTokenizer.v3(is_tekken=True, is_mm=True). Loaded once (about a
    second of CPU) even when several threads ask for it at once, as a worker's preprocessing threads do."""
    with _LOADING:
        return _load()


@functools.cache
def _load() -> MistralTokenizer:
    return MistralTokenizer.from_file(str(TOKENIZER_FILE))
