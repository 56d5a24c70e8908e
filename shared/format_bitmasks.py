"""A batch's token bitmask: one row per sequence, filled by each sequence's FormatMatcher before a step (several
threads for many rows) and applied to the logits on their device."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence

import torch
import xgrammar as xgr

from shared.structured_output import EOS_ONLY_ROW, VOCAB_SIZE, FormatMatcher


def allocate_bitmask(batch_size: int, pin_memory: bool = False) -> torch.Tensor:
    """[batch_size, 4096] int32 on the CPU, every token allowed. Pinned memory lets the copy to the GPU run
    without waiting for the device's queued work."""
    bitmask = xgr.allocate_token_bitmask(batch_size, VOCAB_SIZE)
    return bitmask.pin_memory() if pin_memory else bitmask


_BATCH_FILLER_LOCK = threading.Lock()


@functools.cache
def _batch_filler() -> xgr.BatchGrammarMatcher:
    return xgr.BatchGrammarMatcher(max_threads=min(8, os.cpu_count() or 1))


def fill_bitmasks(matchers: Sequence[FormatMatcher | None], bitmask: torch.Tensor) -> list[int]:
    """Fills row i for each matchers[i] that is not None (several threads for many rows); returns those rows.
    Rows without a matcher are left as they are."""
    rows, active = [], []
    for row, matcher in enumerate(matchers):
        if matcher is None:
            continue
        rows.append(row)
        if matcher.is_terminated:
            bitmask[row] = EOS_ONLY_ROW
        else:
            active.append((row, matcher.xgrammar_matcher))
    if len(active) == 1:
        row, matcher = active[0]
        matcher.fill_next_token_bitmask(bitmask, row)
    elif active:
        with _BATCH_FILLER_LOCK:  # one pool of threads, one batch at a time
            _batch_filler().batch_fill_next_token_bitmask([matcher for _, matcher in active], bitmask,
                                                          [row for row, _ in active])
    return rows


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """Sets to -inf, in place, the logits [B, V] of the tokens that `bitmask` [B, 4096] forbids, in `rows` only:
    the other rows (sequences without a format) are left alone. Runs on the logits' device (CPU or CUDA); a
    CPU bitmask is copied there (from pinned memory, without waiting: refill it only once this step's tokens
    have been read back, which orders the refill after the copy)."""
    if not rows:
        return
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=VOCAB_SIZE, indices=list(rows))
