"""The children of `pixtral-serve` as a supervisor keeps them: each started in a process group of its own (so that a
Ctrl-C in a terminal reaches pixtral-serve alone and the stop keeps its order), its output to a log file or to our
stderr, started again when it dies, and stopped stage by stage.

A child that dies is started again after a backoff that doubles with each crash, on the same port with the same
flags, while the others go on serving (one line on stderr says which child died, how, and when it comes back).
Only a child crashing more than `--max-restarts` times within `--restart-window-s` ends the supervision
(SystemExit). On stop each stage gets SIGTERM, then SIGKILL for what still runs after its grace: `--drain-grace-s`
plus `--grace-s` for the roles, `--grace-s` for Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from services.local_processes import exit_status
from services.serve_config import MAX_BACKOFF_S, ServeConfig
from shared.settings import env_name

# Stop order: the gateway, then the roles it calls, then what they all use.
GATEWAY_STAGE, WORKER_STAGE, REDIS_STAGE = 0, 1, 2


@dataclass(frozen=True)
class ChildSpec:
    name: str                # gateway, decoder0, vision1, redis: also its log file's name
    argv: tuple[str, ...]
    stage: int               # when it is stopped (GATEWAY_STAGE first)
    env: tuple[tuple[str, str], ...] = ()   # added to the environment (its GPU)


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen
    crashes: deque[float] = field(default_factory=deque)   # when it died, within the restart window
    restart_at: float | None = None                         # set while it waits to be started again


class StopRequested(Exception):
    """Ctrl-C or SIGTERM arrived: stop every child, in order."""

class Supervisor:
    def __init__(self, config: ServeConfig, log_dir: Path | None = None) -> None:
        """`log_dir`: each child writes its output to `<name>.log` there (gateway.log, decoder0.log, ...) rather
        than to ours."""
        self.config = config
        self.log_dir = log_dir
        self._children: dict[str, Child] = {}
        self._logs: dict[str, IO[bytes]] = {}   # child name -> its log file (with log_dir)
        self.is_stop_requested = False   # set by a signal handler (main): checked between waits

    @property
    def children(self) -> list[tuple[str, subprocess.Popen]]:
        """(name, process) of every child, as started last."""
        return [(name, child.process) for name, child in self._children.items()]

    def _popen(self, spec: ChildSpec) -> subprocess.Popen:
        env = None
        if self.config.auth_token or spec.env:
            env = {**os.environ, **dict(spec.env)}
        if self.config.auth_token:  # through the environment: argv is visible to every user of the machine
            env[env_name("auth_token")] = self.config.auth_token
        output = None
        if self.log_dir is not None:   # a restarted child's output follows its first run's
            previous = self._logs.pop(spec.name, None)
            if previous is not None:
                previous.close()
            output = self._logs[spec.name] = open(self.log_dir / f"{spec.name}.log", "ab" if previous else "wb")
        # Without a log folder every child writes to our stderr: our stdout carries `ready` alone.
        return subprocess.Popen(spec.argv, stdin=subprocess.DEVNULL, env=env,
                                stdout=sys.stderr.fileno() if output is None else output,
                                stderr=None if output is None else subprocess.STDOUT, process_group=0)

    def spawn(self, spec: ChildSpec) -> subprocess.Popen:
        self._children[spec.name] = Child(spec, self._popen(spec))
        return self._children[spec.name].process

    # -- supervision ----------------------------------------------------------------------------------------------

    def supervise(self) -> None:
        """Starts again the children due for it and notices those that died; SystemExit when one crashed more than
        max_restarts times within the restart window."""
        c = self.config
        now = time.monotonic()
        for child in self._children.values():
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.process, child.restart_at = self._popen(child.spec), None
                continue
            if child.process.poll() is None:
                continue
            status = exit_status(child.process.returncode)
            child.crashes.append(now)
            while child.crashes and child.crashes[0] < now - c.restart_window_s:
                child.crashes.popleft()
            if len(child.crashes) > c.max_restarts:
                raise SystemExit(f"{child.spec.name} (pid {child.process.pid}) {status}: {len(child.crashes)} "
                                 f"crashes within {c.restart_window_s:g} s, more than --max-restarts "
                                 f"{c.max_restarts}; stopping every role")
            delay = min(MAX_BACKOFF_S, c.restart_backoff_s * 2 ** (len(child.crashes) - 1))
            child.restart_at = now + delay
            print(f"pixtral-serve: {child.spec.name} (pid {child.process.pid}) {status}; restarting it in "
                  f"{delay:g} s (restart {len(child.crashes)} of at most {c.max_restarts} within "
                  f"{c.restart_window_s:g} s)", file=sys.stderr, flush=True)

    def serve_forever(self) -> None:
        """Supervises the children until a stop is requested (StopRequested) or one crashes too often."""
        while True:
            self._check_stop()
            self.supervise()
            time.sleep(0.1)

    def wait_for(self, what: str, is_ready) -> None:
        give_up = time.monotonic() + self.config.startup_timeout_s
        while not is_ready():
            self._check_stop()
            self.supervise()
            if time.monotonic() > give_up:
                raise SystemExit(f"{what} not ready after {self.config.startup_timeout_s:.0f} s")
            time.sleep(0.2)

    def _check_stop(self) -> None:
        if self.is_stop_requested:
            raise StopRequested

    # -- stop -------------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stops the children stage by stage: SIGTERM, then SIGKILL for those still running after the stage's
        grace (the roles': --drain-grace-s + --grace-s; Redis: --grace-s)."""
        for stage in (GATEWAY_STAGE, WORKER_STAGE, REDIS_STAGE):
            members = [child.process for child in self._children.values() if child.spec.stage == stage
                       and child.restart_at is None and child.process.poll() is None]
            for process in members:
                process.send_signal(signal.SIGTERM)
            grace_s = self.config.grace_s + (self.config.drain_grace_s if stage != REDIS_STAGE else 0.0)
            give_up = time.monotonic() + grace_s
            for process in members:
                try:
                    process.wait(timeout=max(0.1, give_up - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for output in self._logs.values():
            output.close()
