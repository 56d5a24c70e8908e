"""The Pixtral tokenizer: the checkpoint's own `tekken.json` (Mistral's layout ships one), else mistral-common's
`tekken_240911.json`, shipped inside the mistral-common wheel."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import mistral_common
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

TOKENIZER_FILE = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
# The tokenizer file of a checkpoint in Mistral's layout.
CHECKPOINT_TOKENIZER = "tekken.json"

# The ids of the image row and image end tokens, for writing a Mistral-layout params.json (shared/mistral_layout.py).
IMG_BREAK_ID, IMG_END_ID = 12, 13


_LOADING = threading.Lock()


def tokenizer_file(model_dir: Path) -> Path:
    """The tokenizer of a checkpoint: its own tekken.json if it has one, else the one inside mistral-common."""
    own = Path(model_dir) / CHECKPOINT_TOKENIZER
    return own if own.is_file() else TOKENIZER_FILE


def load_tokenizer(path: Path | None = None) -> MistralTokenizer:
    """The process-wide tokenizer of `path` (default: mistral-common's, equal to MistralTokenizer.v3(is_tekken=True,
    is_mm=True)). Each file is loaded once (about a second of CPU) even when several threads ask for it at once, as
    a worker's preprocessing threads do."""
    with _LOADING:
        return _load(Path(path or TOKENIZER_FILE).resolve())


@functools.cache
def _load(path: Path) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(path))
