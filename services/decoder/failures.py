"""What failed forward passes do to the engine.

A failure ends the streams of its batch with FinishReason.ERROR (the engine does that) and makes the engine
unhealthy (`on_health(False)`) until a forward pass works again: at once a one-token probe runs (when no request
waits to be the probe), then every `retry_interval_s`. After `max_failures` failures in a row the device is taken
as broken (a CUDA fault poisons its context): the engine ends every request and stops, and `on_fatal` lets the
process exit for its supervisor to restart it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from services.decoder.sequence import Sequence
from shared.sampling import SamplingParams

log = logging.getLogger(__name__)


class FailurePolicy:
    def __init__(self, max_failures: int = 3, retry_interval_s: float = 1.0) -> None:
        self.max_failures = max_failures          # failed forward passes in a row before the engine stops
        self.retry_interval_s = retry_interval_s  # between probes after the second failure in a row
        self.num_failures = 0                     # in a row
        self.num_failed_steps = 0                 # in all
        # Called from the engine thread: health changes, and the stop after max_failures.
        self.on_health: Callable[[bool], None] = lambda is_healthy: None
        self.on_fatal: Callable[[], None] = lambda: None

    @property
    def is_healthy(self) -> bool:
        return self.num_failures == 0

    def succeeded(self) -> None:
        if self.num_failures:
            log.warning("forward pass succeeded again after %d failures: healthy", self.num_failures)
            self.num_failures = 0
            self.on_health(True)

    def failed(self, error: Exception, num_ended: int) -> bool:
        """Records a failed forward pass that ended `num_ended` sequences; True when the engine must stop."""
        log.error("forward pass failed (%s: %s); ending %d sequences", type(error).__name__, error, num_ended,
                  exc_info=error)
        self.num_failed_steps += 1
        self.num_failures += 1
        if self.num_failures == 1:
            self.on_health(False)
        if self.num_failures >= self.max_failures:
            log.error("%d forward passes failed in a row: stopping the engine", self.num_failures)
            return True
        return False

    def pause(self) -> None:
        """A device that failed twice in a row gets time to recover before the next forward pass."""
        if self.num_failures > 1:
            time.sleep(self.retry_interval_s)


def probe_sequence(request_id: str, token_id: int, eos_token_id: int) -> Sequence:
    """A one-token prompt any checkpoint can run, generating one token: a forward pass to find out whether the
    device works again after failures."""
    return Sequence(request_id=request_id, token_ids=[token_id], num_prompt_tokens=1,
                    sampling=SamplingParams(max_tokens=1), max_model_len=2, arrival=-1, eos_token_id=eos_token_id)
