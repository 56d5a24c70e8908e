"""The vision worker's encoder: preprocessed pixels -> per-patch features (before the projector).

Loads only `vision_tower.*` from the checkpoint. Features are cached before the multimodal projector (1024
values a patch for Pixtral-12B instead of 5120): the decoder applies the projector.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from services.vision.graphs import TowerGraphs
from services.vision.model import VisionSpec, VisionTower, state_from_checkpoint
from shared import checkpoint, sdpa


class VisionEncoder:
    def __init__(self, tower: VisionTower, device: torch.device, dtype: torch.dtype, max_graphs: int = 0) -> None:
        self.tower = tower
        self.device = device
        self.dtype = dtype
        self.num_columns = tower.spec.hidden_size
        # A batch shape is captured once its attention has moved to cuDNN (shared/sdpa.py): one call a layer a pass
        passes = sdpa.CUDNN_AFTER // tower.spec.num_layers + 1
        self.graphs = TowerGraphs(tower, max_graphs, passes) if device.type == "cuda" and max_graphs > 0 else None

    def warm_up(self) -> None:
        """One pass at start-up: library handles, kernel choices and memory pools are made before any request."""
        self.encode([np.zeros((3, 512, 512), dtype=np.float32), np.zeros((3, 64, 32), dtype=np.float32)])
        spec = self.tower.spec
        sdpa.warm_up_cudnn(spec.num_heads, spec.num_heads, spec.head_dim, False, self.dtype, self.device)

    @torch.inference_mode()
    def encode(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """[(3, H, W) float32 preprocessed pixels] -> [(H/16 * W/16, hidden) features on CPU], one per image,
        encoded together in one forward pass."""
        pixels = [torch.from_numpy(image).to(self.device, non_blocking=True) for image in images]
        features = self.graphs(pixels) if self.graphs is not None else None
        if features is None:
            features = self.tower(pixels)
        return [rows.cpu() for rows in features]


def load_vision_encoder(model_dir: Path, device: torch.device, dtype: torch.dtype,
                        max_graphs: int = 0) -> VisionEncoder:
    spec = VisionSpec.from_config(checkpoint.load_config(model_dir).vision_config)
    seed = checkpoint.random_weights_seed(model_dir)
    if seed is not None:
        return VisionEncoder(random_tower(spec, dtype, device, seed), device, dtype, max_graphs)
    tensors = checkpoint.read_tensors(model_dir, checkpoint.part_renamer("vision_tower"), dtype, device)
    with torch.device("meta"):
        tower = VisionTower(spec, use_fused_kernels=device.type == "cuda")
    tower.load_state_dict(state_from_checkpoint(tensors, spec), strict=True, assign=True)
    return VisionEncoder(tower.eval().requires_grad_(False), device, dtype, max_graphs)


def random_tower(spec: VisionSpec, dtype: torch.dtype, device: torch.device, seed: int) -> VisionTower:
    """Random weights at `spec`'s shape made on `device` (benchmarks: the same compute as real weights)."""
    torch.manual_seed(seed)
    with torch.device(device):
        tower = VisionTower(spec, use_fused_kernels=device.type == "cuda").to(dtype)
    for name, param in tower.named_parameters():
        if "norm" not in name and name != "ln_pre":
            param.data.normal_(0.0, 0.02)
    return tower.eval().requires_grad_(False)
