"""The attention backend policy: a shape goes to cuDNN only once it has been called often (pure logic)."""

from __future__ import annotations

import torch

from shared import sdpa


def test_a_shape_moves_to_cudnn_after_enough_calls_and_the_count_is_bounded(monkeypatch):
    monkeypatch.setattr(sdpa, "_calls", type(sdpa._calls)())
    monkeypatch.setattr(sdpa, "CUDNN_AFTER", 3)
    monkeypatch.setattr(sdpa, "_MAX_SHAPES", 2)
    first = [sdpa.backends_for(("a",)) for _ in range(4)]
    assert first[:3] == [sdpa._RARE] * 3 and first[3] == sdpa._FREQUENT
    assert first[0][0] == torch.nn.attention.SDPBackend.FLASH_ATTENTION
    sdpa.backends_for(("b",))
    sdpa.backends_for(("c",))            # "a" was used least recently: its count is dropped
    assert list(sdpa._calls) == [("b",), ("c",)]
    assert sdpa.backends_for(("a",)) == sdpa._RARE


def test_attention_on_the_cpu_is_plain_sdpa():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(sdpa.attention(q, k, v, is_causal=True), expected)
    assert sdpa.prefill_chunk_attention(q, k, v, 0.3) is None   # the CPU path builds its mask instead
