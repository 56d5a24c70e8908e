"""Which vision batches replay a CUDA graph: a shape is captured after `after` passes, at most `capacity` kept
(least recently used dropped), large batches never, and a failed capture leaves the encoder eager. The capture
itself runs on CUDA machines (tests/kernel_checks.py); here it is replaced by a function that records its calls."""

from __future__ import annotations

import torch

from services.vision.graphs import TowerGraphs


class Captures:
    def __init__(self, fail: bool = False) -> None:
        self.shapes: list[tuple] = []
        self.fail = fail

    def __call__(self, pixels):
        if self.fail:
            raise RuntimeError("CUDA out of memory")
        self.shapes.append(tuple(p.shape for p in pixels))
        return lambda pixels: [torch.full((1,), float(p.shape[1])) for p in pixels]


def batch(*sizes: int) -> list[torch.Tensor]:
    return [torch.zeros(3, size, size) for size in sizes]


def test_a_shape_is_captured_on_its_after_th_pass_and_replayed_from_then_on():
    captures = Captures()
    graphs = TowerGraphs(tower=None, capacity=4, after=3, capture=captures)
    assert graphs(batch(32)) is None and graphs(batch(32)) is None
    assert graphs(batch(32, 16)) is None                       # another shape counts apart
    assert [float(x) for x in graphs(batch(32))] == [32.0]     # third pass: captured and replayed
    assert [float(x) for x in graphs(batch(32))] == [32.0]
    assert captures.shapes == [(torch.Size([3, 32, 32]),)]
    assert graphs(batch(16, 32)) is None                       # the order of the images is part of the shape


def test_at_most_capacity_graphs_are_kept_least_recently_used_dropped():
    captures = Captures()
    graphs = TowerGraphs(tower=None, capacity=2, after=1, capture=captures)
    for size in (16, 32, 16, 48):                              # 16 used again after 32: 32 is dropped for 48
        assert graphs(batch(size)) is not None
    assert [key[0][0][1] for key in graphs.graphs] == [16, 48]
    assert len(captures.shapes) == 3
    graphs(batch(32))
    assert len(captures.shapes) == 4                           # captured again


def test_no_capacity_means_no_graphs():
    captures = Captures()
    graphs = TowerGraphs(tower=None, capacity=0, after=1, capture=captures)
    assert graphs(batch(16)) is None and graphs(batch(16)) is None and not captures.shapes


def test_a_failed_capture_turns_graphs_off_and_the_batch_runs_eagerly():
    graphs = TowerGraphs(tower=None, capacity=4, after=1, capture=Captures(fail=True))
    assert graphs(batch(16)) is None
    assert graphs.capacity == 0 and not graphs.graphs
    assert graphs(batch(16)) is None


def test_batches_of_more_than_max_pixels_are_not_captured():
    captures = Captures()
    graphs = TowerGraphs(tower=None, capacity=4, after=1, capture=captures)
    assert graphs(batch(*[512] * 9)) is None and graphs(batch(*[512] * 9)) is None   # 2,359,296 pixels
    assert graphs(batch(*[512] * 8)) is not None                                     # 2,097,152: the limit
    assert len(captures.shapes) == 1
