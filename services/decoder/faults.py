"""Fault injection, for tests only: off unless the decoder is started with `--fault-forward-file`.

Tests must make a forward pass fail in the middle of a batch of streams, in a separate process, at a moment they
choose: while the named file exists, every forward pass raises, as a device fault would.
"""

from __future__ import annotations

import logging
from pathlib import Path

from services.decoder.model_runner import LaunchedStep, ModelRunner
from services.decoder.scheduler import ScheduledBatch

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    pass


class FailingRunner:
    """The model runner, except that launch() raises while `marker` exists."""

    def __init__(self, runner: ModelRunner, marker: str) -> None:
        self.runner = runner
        self.marker = Path(marker)
        log.warning("fault injection on: forward passes fail while %s exists", marker)

    def launch(self, batch: ScheduledBatch, previous: LaunchedStep | None = None) -> LaunchedStep:
        if self.marker.exists():
            raise InjectedFault("injected forward-pass fault")
        return self.runner.launch(batch, previous)

    def sample(self, step: LaunchedStep) -> None:
        self.runner.sample(step)

    def collect(self, step: LaunchedStep) -> list[int | None]:
        return self.runner.collect(step)
