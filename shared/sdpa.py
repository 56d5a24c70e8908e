"""Scaled dot-product attention, on CUDA with the backend measured fastest first.

On the H100, cuDNN's attention beats flash attention by 30-46% for the service's shapes (vision tower
[1, 16, 4096, 64]: 0.18 vs 0.26 ms; 4,183-token causal prefill [1, 32, 4183, 128]: 0.31 vs 0.57 ms;
bench/attention_backends.py). PyTorch falls back to the next backend when one cannot take a call (a mask,
a head size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_CUDA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs) -> torch.Tensor:
    if query.is_cuda:
        with sdpa_kernel(_CUDA_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(query, key, value, **kwargs)
    return F.scaled_dot_product_attention(query, key, value, **kwargs)
