"""The Pixtral vision tower: preprocessed pixels -> per-patch features (before the projector).

Loads only `vision_tower.*` from the checkpoint. Features are cached before the multimodal projector (1024
values a patch for Pixtral-12B instead of 5120): the decoder applies the projector.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers.models.pixtral.modeling_pixtral import PixtralVisionModel

from shared import checkpoint

PATCH_SIZE = 16


class VisionEncoder:
    def __init__(self, model: PixtralVisionModel, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.num_columns = model.config.hidden_size

    @torch.inference_mode()
    def encode(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """[(3, H, W) float32 preprocessed pixels] -> [(H/16 * W/16, hidden) features on CPU], one per image."""
        features = []
        for pixels in images:
            height, width = pixels.shape[1:]
            batch = torch.from_numpy(pixels)[None].to(self.device, self.dtype)
            sizes = torch.tensor([[height, width]], device=self.device)
            out = self.model(batch, image_sizes=sizes).last_hidden_state[0]   # [patches, hidden]
            assert out.shape[0] == (height // PATCH_SIZE) * (width // PATCH_SIZE)
            features.append(out.cpu())
        return features


def load_vision_encoder(model_dir: Path, device: torch.device, dtype: torch.dtype) -> VisionEncoder:
    config = checkpoint.load_config(model_dir).vision_config
    state = checkpoint.read_tensors(model_dir, checkpoint.part_renamer("vision_tower"), dtype, device)
    with torch.device("meta"):
        model = PixtralVisionModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    # The rotary table is a non-persistent buffer: build it for real on the device.
    model.patch_positional_embedding = type(model.patch_positional_embedding)(config).to(device)
    return VisionEncoder(model.eval().requires_grad_(False), device, dtype)
