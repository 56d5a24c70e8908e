"""The packed vision tower equals transformers' PixtralVisionModel, and batching does not change features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.vision.encoder import load_vision_encoder
from shared.images import preprocess
from tests.reference import llava
from tests.support import image_bytes, noise_image

SIZES = [(300, 200), (64, 64), (1500, 90), (64, 64), (17, 33), (300, 200)]


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return load_vision_encoder(tiny_model, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def images():
    return [preprocess(image_bytes(noise_image(w, h, seed=i)), 10**8) for i, (w, h) in enumerate(SIZES)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_features_equal_transformers_get_image_features(encoder, images, tiny_model):
    model = llava(tiny_model)
    for pixels in images:
        height, width = pixels.shape[1:]
        with torch.inference_mode():
            reference = model.model.vision_tower(torch.from_numpy(pixels)[None],
                                                 image_sizes=torch.tensor([[height, width]])).last_hidden_state[0]
        (ours,) = encoder.encode([pixels])
        assert ours.shape == reference.shape == ((height // 16) * (width // 16), 64)
        assert relative_error(ours, reference) < 1e-5


def test_a_mixed_batch_equals_one_image_at_a_time(encoder, images):
    alone = [encoder.encode([pixels])[0] for pixels in images]
    together = encoder.encode(images)
    for a, b in zip(alone, together):
        assert a.shape == b.shape and relative_error(b, a) < 1e-5


def test_same_sized_images_in_one_group_do_not_see_each_other(encoder):
    first = preprocess(image_bytes(noise_image(64, 48, seed=1)), 10**8)
    second = np.ascontiguousarray(first[:, ::-1, :])
    (alone,) = encoder.encode([first])
    together = encoder.encode([first, second])
    assert relative_error(together[0], alone) < 1e-5
    assert relative_error(together[1], together[0]) > 1e-2
