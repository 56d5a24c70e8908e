"""Checkpoint loading: each role reads only its own tensors; the fingerprint follows the vision weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from services.decoder.weights import load_decoder
from services.vision.encoder import load_vision_encoder
from shared import checkpoint
from shared.fingerprints import vision_fingerprint
from tests.conftest import make_tiny_checkpoint

CPU = torch.device("cpu")


class RecordingSafeOpen:
    """Wraps safetensors.safe_open and records every tensor name read."""

    def __init__(self):
        self.read: list[str] = []

    def __call__(self, *args, **kwargs):
        recorder = self

        class Handle:
            def __init__(self):
                self.inner = safe_open(*args, **kwargs)

            def __enter__(self):
                self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def get_tensor(self, name):
                recorder.read.append(name)
                return self.inner.get_tensor(name)

            def keys(self):
                return self.inner.keys()

        return Handle()


def test_tiny_checkpoint_has_the_published_layout(tiny_model):
    index = json.loads((tiny_model / checkpoint.INDEX_FILE).read_text())
    names = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) == 3
    assert "language_model.lm_head.weight" in names and "language_model.model.embed_tokens.weight" in names
    assert any(name.startswith("vision_tower.transformer.layers.0.") for name in names)
    assert {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias"} <= names
    config = checkpoint.load_config(tiny_model)
    assert config.text_config.vocab_size == 131072 and config.vision_config.hidden_act == "silu"


@pytest.mark.parametrize("role", ["vision", "decoder"])
def test_partial_loaders_never_read_the_other_roles_tensors(tiny_model, monkeypatch, role):
    recorder = RecordingSafeOpen()
    monkeypatch.setattr(checkpoint, "safe_open", recorder)
    if role == "vision":
        encoder = load_vision_encoder(tiny_model, CPU, torch.float32)
        assert all(name.startswith("vision_tower.") for name in recorder.read)
        expected = {n for n in checkpoint.tensor_files(tiny_model) if n.startswith("vision_tower.")}
        assert set(recorder.read) == expected
        assert not any(p.is_meta for p in encoder.tower.parameters())
    else:
        model = load_decoder(tiny_model, torch.float32, CPU)
        assert not any(name.startswith("vision_tower.") for name in recorder.read)
        expected = {n for n in checkpoint.tensor_files(tiny_model) if not n.startswith("vision_tower.")}
        assert set(recorder.read) == expected
        assert not any(p.is_meta for p in model.parameters())


def test_single_file_and_sharded_checkpoints_load_the_same(tiny_model, tmp_path):
    single = make_tiny_checkpoint(tmp_path / "single", seed=0, shards=1)
    a = load_decoder(single, torch.float32, CPU).state_dict()
    b = load_decoder(tiny_model, torch.float32, CPU).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert vision_fingerprint(single) == vision_fingerprint(tiny_model)


def test_fingerprint_changes_with_vision_weights_only(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "base", seed=3)
    fingerprint = vision_fingerprint(base)

    def edited(name: str, prefix: str):
        copy = tmp_path / name
        shutil.copytree(base, copy)
        tensors = load_file(copy / checkpoint.SINGLE_FILE)
        key = next(k for k in sorted(tensors) if k.startswith(prefix))
        tensors[key] = tensors[key] + 1.0
        save_file(tensors, copy / checkpoint.SINGLE_FILE, metadata={"format": "pt"})
        return vision_fingerprint(copy)

    assert edited("lm", "language_model.") == fingerprint
    assert edited("vision", "vision_tower.") != fingerprint
    assert vision_fingerprint(make_tiny_checkpoint(tmp_path / "other", seed=4)) != fingerprint
