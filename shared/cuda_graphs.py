"""Capturing a CUDA graph, for the decoder's steps and the vision tower's passes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture(fn: Callable[[], T], pool=None) -> tuple[torch.cuda.CUDAGraph, T]:
    """fn() once on a side stream, then captured -> (the graph, fn's outputs, which each replay overwrites).

    The first call makes outside the capture what cannot be made in it: library handles, kernel plans and
    compiled kernels, the allocator's blocks. `pool`: another graph's memory pool to share (graphs that never run
    at the same time)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    return graph, outputs
