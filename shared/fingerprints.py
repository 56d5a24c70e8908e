"""Model fingerprints: short hashes naming what produced a cached value, part of every key that holds one.

`vision_fingerprint` names what makes an image's features (vision weights and config, preprocessing): the cache
key of embeddings. `decoder_fingerprint` names what computes a prompt's KV entries and logits (language-model and
projector weights, text config, quantization). Both hash the tensors' raw bytes as the Hugging Face layout stores
them, so the same weights give the same fingerprint in any sharding or layout.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import mmap
import os
from pathlib import Path

import numpy as np

from shared import mistral_layout
from shared.checkpoint import (TensorSource, load_config, part_renamer, quantization, random_weights_seed,
                               safetensors_header, tensor_sources)

# Bumped whenever image preprocessing changes in a way the weights do not show: it is part of the fingerprint.
PREPROCESSING_VERSION = "mistral-common-1.13.1/patch16/max1024/cubic/clip-mean-std/v1"
# The tokenizer's image settings PREPROCESSING_VERSION stands for; a checkpoint's tekken.json with others is hashed.
DEFAULT_IMAGE_CONFIG = {"image_patch_size": 16, "max_image_size": 1024, "spatial_merge_size": 1}
# The text config fields that decide what the language model computes (not its context limit or token ids).
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters")


def _hash_bytes(source: TensorSource, headers: dict[Path, tuple[int, dict]], digest) -> None:
    """Feeds `digest` the raw bytes of a tensor as the Hugging Face layout stores it (Mistral's q/k rows reordered),
    read from the memory-mapped file."""
    base, entries = headers[source.file]
    entry = entries[source.key]
    start, end = entry["data_offsets"]
    with open(source.file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        raw = np.frombuffer(data, dtype=np.uint8, count=end - start, offset=base + start)
        if source.num_rope_heads:
            rows = entry["shape"][0]
            raw = raw.reshape(rows, -1)[mistral_layout.rope_row_order(rows, source.num_rope_heads).numpy()]
        digest.update(raw)
        del raw   # the map closes only once no array refers to it


def _entry(source: TensorSource, headers: dict[Path, tuple[int, dict]]) -> str:
    """"dtype:shape" of a tensor, from its file's header."""
    entry = headers[source.file][1][source.key]
    return f"{entry['dtype']}:{entry['shape']}"


def _sources_of(model_dir: Path, parts: tuple[str, ...]) -> list[tuple[str, TensorSource]]:
    """The tensors of `parts`, by name (the same bytes in any sharding or layout give the same digest)."""
    renamers = [part_renamer(part) for part in parts]
    return sorted((name, source) for name, source in tensor_sources(model_dir).items()
                  if any(rename(name) is not None for rename in renamers))


def vision_fingerprint(model_dir: Path) -> str:
    """16 hex chars naming what produces cached features: vision weights, vision config, preprocessing.

    Hashes the raw bytes of every vision-tower tensor (read from the memory-mapped files), so any change of the
    weights gives new cache keys and stale embeddings are never served. A checkpoint in Mistral's layout gives the
    fingerprint of its Hugging Face conversion. FP8 checkpoints keep the vision tower unquantized, so an FP8
    checkpoint and its bf16 twin share cached features, which are the same bits (a quantized vision tower would
    change the bytes hashed, hence the fingerprint)."""
    config = load_config(model_dir)
    digest = hashlib.sha256()
    digest.update(PREPROCESSING_VERSION.encode())
    digest.update(json.dumps(config.vision_config.to_dict(), sort_keys=True, default=str).encode())
    image_config = _tokenizer_image_config(model_dir)
    if image_config != DEFAULT_IMAGE_CONFIG:
        digest.update(json.dumps(image_config, sort_keys=True).encode())
    seed = random_weights_seed(model_dir)
    if seed is not None:
        digest.update(f"random weights, seed {seed}".encode())
        return digest.hexdigest()[:16]
    rename = part_renamer("vision_tower")
    sources = _sources_of(model_dir, ("vision_tower",))
    headers = {file: safetensors_header(file) for file in {source.file for _, source in sources}}
    for name, source in sources:
        digest.update(f"{rename(name)}:{_entry(source, headers)}".encode())
        _hash_bytes(source, headers, digest)
    return digest.hexdigest()[:16]


def _tokenizer_image_config(model_dir: Path) -> dict:
    """The image settings of the tokenizer that preprocesses for this checkpoint (its own tekken.json, if any)."""
    # Imported here: shared.tokenizer loads mistral-common, which the decoder needs nowhere else.
    from shared.tokenizer import TOKENIZER_FILE, tokenizer_file
    path = tokenizer_file(model_dir)
    if path == TOKENIZER_FILE:
        return DEFAULT_IMAGE_CONFIG
    return {**DEFAULT_IMAGE_CONFIG, **(json.loads(path.read_text()).get("image") or {})}


def decoder_fingerprint(model_dir: Path, load_quantization: str | None = None) -> str:
    """16 hex chars naming what computes a prompt's KV entries and logits: the language model's and projector's
    tensors (their bytes and dtypes, FP8 scales included), the text config, the checkpoint's quantization scheme and
    one applied at load (`load_quantization`, e.g. "fp8"). An FP8 checkpoint and its bf16 twin differ, so KV blocks
    or outputs keyed by it are never mixed up between them (a decoder's own prefix cache holds the blocks of its one
    model only); either layout of one checkpoint gives the same.

    Tensors are hashed in parallel threads (hashlib releases the GIL): reading the weights is what takes time."""
    config = load_config(model_dir)
    text = config.text_config.to_dict()
    digest = hashlib.sha256(b"pixtral decoder v1")
    digest.update(json.dumps({field: text.get(field) for field in _TEXT_FIELDS}, sort_keys=True).encode())
    digest.update(json.dumps([config.projector_hidden_act, config.multimodal_projector_bias,
                              config.vision_config.hidden_size]).encode())
    digest.update(repr((quantization(model_dir), load_quantization)).encode())
    seed = random_weights_seed(model_dir)
    if seed is not None:
        digest.update(f"random weights, seed {seed}".encode())
        return digest.hexdigest()[:16]
    sources = _sources_of(model_dir, ("language_model", "projector"))
    headers = {file: safetensors_header(file) for file in {source.file for _, source in sources}}

    def tensor_digest(source: TensorSource) -> bytes:
        tensor_hash = hashlib.sha256()
        _hash_bytes(source, headers, tensor_hash)
        return tensor_hash.digest()

    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        digests = pool.map(tensor_digest, [source for _, source in sources])
        for (name, source), tensor_hash in zip(sources, digests):
            digest.update(f"{name}:{_entry(source, headers)}:".encode() + tensor_hash)
    return digest.hexdigest()[:16]

