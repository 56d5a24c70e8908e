"""Host-to-device copies of a step's inputs that never wait for the step in flight.

A copy from ordinary (pageable) memory waits for the device's queued work, so while the engine prepares a step
the device would finish the one before and idle. Copies from page-locked memory are queued like kernels.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy through page-locked memory on CUDA (the tensor itself elsewhere)."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


class ImageRowStaging:
    """Page-locked buffers, allocated once, that a step's image rows pass through on their way to the GPU.

    The rows live in ordinary memory (features.py says why), and allocating page-locked memory per step would wait
    for the device as a plain copy does. Two buffers take turns, so filling one never waits: the copy out of the
    other was queued two steps ago, and the engine has read the step before the one in flight by the time it
    launches the next."""

    def __init__(self, max_rows: int, columns: int, dtype: torch.dtype) -> None:
        self.buffers = [torch.empty(max_rows, columns, dtype=dtype, pin_memory=True) for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]   # recorded after each buffer's last copy
        self.turn = 0

    def to_device(self, parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """[rows_i, columns] host tensors -> one [sum rows_i, columns] tensor on the device, in the buffers'
        dtype (the model's: embed() converts to it anyway)."""
        if parts[0].device.type != "cpu":   # on the device already: the service's rows never are, benchmarks' may be
            return torch.cat([part.to(device) for part in parts])
        num_rows = sum(part.shape[0] for part in parts)
        buffer = self.buffers[self.turn]
        if num_rows > buffer.shape[0]:   # more rows than a step holds: not expected; correct, only slower
            return to_device(torch.cat(parts), device)
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()
        start = 0
        for part in parts:
            buffer[start:start + part.shape[0]].copy_(part)
            start += part.shape[0]
        on_device = buffer[:num_rows].to(device, non_blocking=True)
        self.copied[self.turn] = torch.cuda.Event()
        self.copied[self.turn].record()
        self.turn ^= 1
        return on_device
