"""The stack a load benchmark starts for its run when it is given no gateway: pixtral-serve's launcher on a Redis
of its own (a clean cache, its memory measured too), the processes' ids for their CPU and memory readings."""

from __future__ import annotations

import os
from pathlib import Path


def start_stack(args, model: str = "tiny", device: str = "cpu", metrics_port: int | None = None,
                log_dir: Path | None = None) -> tuple[object, object, str, str, dict[str, int]]:
    """(launcher, redis server, gateway address, its HTTP API's URL, {process name: pid}) of the stack started for
    the run: `model` (a checkpoint directory or tiny) on `device`; `metrics_port`: the launcher's --metrics-port
    (None: its default)."""
    from services.launcher import Launcher
    from services.local_processes import free_port
    from services.serve_config import ServeConfig
    from tests.support import RedisServer
    for setting in args.set:
        name, _, value = setting.partition("=")
        os.environ[f"PIXTRAL_{name.upper()}"] = value   # read by the roles' configs; unknown ones are ignored
    # Its own Redis: a clean cache, and its memory measured too. With a memory cap, as deploy/ lays it out: only
    # embeddings (written with an expiry) are evicted, never the job stream.
    cap = ("--maxmemory", f"{args.redis_maxmemory_mib}mb", "--maxmemory-policy", "volatile-lru") \
        if args.redis_maxmemory_mib else ()
    if cap:
        os.environ["PIXTRAL_EMBEDDING_TTL_S"] = "86400"
    redis_server = RedisServer(cap).start()
    http_port = free_port()
    metrics = {} if metrics_port is None else {"metrics_port": metrics_port}
    launcher = Launcher(ServeConfig(model=model, device=device, redis=redis_server.url,
                                    vision_workers=args.vision_workers, decoders=args.decoders, port=free_port(),
                                    vision_gpus=getattr(args, "vision_gpus", ServeConfig.vision_gpus),
                                    http_port=http_port, **metrics), log_dir=log_dir)
    gateway = launcher.start()
    pids = {name.replace(" ", ""): process.pid for name, process in launcher.children}
    pids["redis"] = redis_server.process.pid
    return launcher, redis_server, gateway, f"http://127.0.0.1:{http_port}/v1", pids

