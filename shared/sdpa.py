"""Scaled dot-product attention on CUDA: flash attention for shapes seen rarely, cuDNN's for shapes seen often.

cuDNN's attention is the fastest for the service's shapes on Hopper (bench/attention_backends.py), but it builds an
execution plan the first time it sees a shape (tens of milliseconds for a causal prefill, hundreds with a mask).
Prompt lengths and image sizes change from request to request, so a shape runs on flash attention (nothing to
build) until it has been called CUDNN_AFTER times; then its cuDNN plan is built once, which the faster calls repay.
PyTorch falls back to the next backend when one cannot take a call (a mask, a head size).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CUDNN_AFTER = 512     # calls of one shape (a forward pass makes one per layer) before it moves to cuDNN
_MAX_SHAPES = 4096    # shapes whose calls are counted, least recently used dropped first
_RARE = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
_FREQUENT = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
_calls: OrderedDict[tuple, int] = OrderedDict()


def backends_for(key: tuple) -> list[SDPBackend]:
    """The backend order of a call of this shape, counting the call."""
    count = _calls.pop(key, 0) + 1
    _calls[key] = count
    if len(_calls) > _MAX_SHAPES:
        _calls.popitem(last=False)
    return _FREQUENT if count > CUDNN_AFTER else _RARE


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs) -> torch.Tensor:
    if not query.is_cuda:
        return F.scaled_dot_product_attention(query, key, value, **kwargs)
    shape = (tuple(query.shape), tuple(key.shape), query.dtype, kwargs.get("is_causal", False),
             kwargs.get("attn_mask") is not None)
    with sdpa_kernel(backends_for(shape), set_priority=True):
        return F.scaled_dot_product_attention(query, key, value, **kwargs)


def warm_up_cudnn(num_heads: int, num_kv_heads: int, head_dim: int, is_causal: bool, dtype: torch.dtype,
                  device: torch.device) -> None:
    """Has cuDNN compile its attention kernels of one kind (causal or not, head size, grouped heads) at start-up.

    cuDNN compiles them the first time a call of that kind reaches it, once per machine (the CUDA cache keeps
    them), which takes far longer than building the plan of a new shape once they are compiled. Without this, the
    request whose shape first moved to cuDNN waited for that, and with it every stream of its role."""
    if device.type != "cuda":
        return
    for length in (1000, 1024):   # a multiple of the kernels' tile and not
        query = torch.zeros(1, num_heads, length, head_dim, dtype=dtype, device=device)
        key = torch.zeros(1, num_kv_heads, length, head_dim, dtype=dtype, device=device)
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), warnings.catch_warnings():
                warnings.simplefilter("ignore")   # PyTorch's reasons when cuDNN declines a shape
                F.scaled_dot_product_attention(query, key, key, is_causal=is_causal,
                                               enable_gqa=num_heads != num_kv_heads)
        except RuntimeError:
            return   # cuDNN cannot take these calls here: they run on the other backends


def prefill_chunk_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            scale: float) -> torch.Tensor | None:
    """Causal attention of the last query_len positions of a context (a later chunk of a prompt, or a prompt after
    a cached prefix): query [1, H, L, D] over key/value [1, Hkv, C, D], C >= L, query i seeing keys <= C - L + i.
    Flash attention's causal mask is aligned to the bottom right, which is exactly that, with no mask to build
    (as a mask, cuDNN would build a plan per shape: 676 ms). None where flash attention cannot run it."""
    if not query.is_cuda:
        return None
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False,
                                                                   scale=scale)[0]
    except RuntimeError:
        return None


def varlen_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_query: torch.Tensor,
                            cu_context: torch.Tensor, max_query: int, max_context: int,
                            scale: float) -> torch.Tensor | None:
    """Causal attention of packed sequences in one flash attention call: sequence i's query rows
    cu_query[i]:cu_query[i+1] of query [Tq, H, D] are the last L_i positions of its context, the key/value rows
    cu_context[i]:cu_context[i+1] of [Tk, Hkv, D] (C_i >= L_i); query j of a sequence sees keys <= C_i - L_i + j
    (the causal mask aligned to the bottom right, as prefill_chunk_attention). Grouped heads are taken as they
    are. -> [Tq, H, D]; None where flash attention cannot run it (not CUDA, a dtype it does not take)."""
    if not query.is_cuda:
        return None
    try:
        return torch.ops.aten._flash_attention_forward(query, key, value, cu_query, cu_context, max_query,
                                                       max_context, 0.0, True, False, scale=scale)[0]
    except RuntimeError:
        return None
