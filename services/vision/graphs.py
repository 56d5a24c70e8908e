"""CUDA graphs of the vision tower for the batch shapes a worker encodes often.

An eager forward pass launches ~240 kernels, and on a host that launches them slowly the host, not the GPU, sets
its time; a replayed graph launches them at once (bench/gpu_vision.py; docs/benchmarks.md).

Image sizes vary, so a batch shape (the sizes of its images, in order) is captured only once it has been encoded
`after` times, and at most `capacity` graphs are kept, the least recently used dropped. They share one memory
pool (the worker runs one batch at a time), which holds the activations of the largest batch captured
(bench/gpu_profile.py, `graphs_memory_*`). Batches of more than MAX_PIXELS are not captured: they are bound by the
GPU, not the host, and their activations would make the pool large.

The tower is called as tower(pixels, captured=True) for the capture and the pass that warms it up: a captured pass
launches once, so it takes kernels whose launches cost the host more (VisionTower.forward).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch

from shared.cuda_graphs import capture

log = logging.getLogger(__name__)

Replay = Callable[[list[torch.Tensor]], list[torch.Tensor]]
_MAX_COUNTED = 1024   # shapes not captured whose passes are counted, least recently seen dropped first
MAX_PIXELS = 2 * 1024 * 1024   # the largest batch captured: two 1024x1024 images, eight 512x512


class TowerGraphs:
    def __init__(self, tower: Callable[..., list[torch.Tensor]], capacity: int, after: int,
                 capture: Callable[[list[torch.Tensor]], Replay] | None = None) -> None:
        self.tower = tower
        self.capacity = capacity
        self.after = after
        self.capture = capture or self._capture_cuda
        self.graphs: OrderedDict[tuple, Replay] = OrderedDict()
        self._passes: OrderedDict[tuple, int] = OrderedDict()
        self._pool = None

    def __call__(self, pixels: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The tower's features of `pixels` from a graph (static buffers: copy them before the next call), or
        None where this batch shape runs eagerly."""
        if self.capacity <= 0 or sum(p.shape[-2] * p.shape[-1] for p in pixels) > MAX_PIXELS:
            return None
        key = tuple((tuple(p.shape), p.dtype) for p in pixels)
        replay = self.graphs.get(key)
        if replay is not None:
            self.graphs.move_to_end(key)
            return replay(pixels)
        passes = self._passes.pop(key, 0) + 1
        if passes < self.after:
            self._passes[key] = passes
            if len(self._passes) > _MAX_COUNTED:
                self._passes.popitem(last=False)
            return None
        try:
            replay = self.graphs[key] = self.capture(pixels)
        except RuntimeError as error:   # out of memory, or a kernel that cannot be captured: stay eager
            log.warning("CUDA graphs of the vision tower turned off: capturing a batch of %s failed: %s",
                        [tuple(p.shape[1:]) for p in pixels], error)
            self.capacity = 0
            self.graphs.clear()
            return None
        if len(self.graphs) > self.capacity:
            self.graphs.popitem(last=False)
        return replay(pixels)

    def _capture_cuda(self, pixels: list[torch.Tensor]) -> Replay:
        inputs = [p.clone() for p in pixels]
        graph, outputs = capture(lambda: self.tower(inputs, captured=True), self._pool)
        self._pool = graph.pool()

        def replay(pixels: list[torch.Tensor]) -> list[torch.Tensor]:
            for static, x in zip(inputs, pixels):
                static.copy_(x)
            graph.replay()
            return outputs
        return replay
