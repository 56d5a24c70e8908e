"""`pixtral-serve`: every role as its own process on this machine, for development and single-host serving.

Starts Redis if needed (two: a cache bounded by --cache-memory-mib that evicts the least recently used embeddings,
and one for the job protocol that evicts nothing), M decoders, N vision workers and the gateway; prints
`ready <host:port>` once the gateway answers SERVING, and on stderr where each role serves its metrics
(`metrics <name> <url>`).

It supervises them (services/supervisor.py): a child that dies is started again on the same port with the same
flags. The gateway finds a restarted decoder again, a restarted vision worker (same consumer name) takes up the
jobs it held, a private Redis comes back empty (the roles survive that). Only a child crashing more than
`--max-restarts` times within `--restart-window-s` ends pixtral-serve: every child is stopped, and it exits 1.

On Ctrl-C or SIGTERM it stops them in order: the gateway first (its streams finish on decoders that are still up,
and requests waiting for an image get it from vision workers that are still up), then the decoders and vision
workers, then Redis. Each role gets `--drain-grace-s` (passed to every role, so they agree) plus `--grace-s` to
exit before SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from services.gpu_placement import place, visible_gpus
from services.local_processes import free_port, is_bindable, is_serving, redis_answers
from services.serve_config import LOCAL_REDIS, ServeConfig
from services.supervisor import GATEWAY_STAGE, REDIS_STAGE, WORKER_STAGE, ChildSpec, StopRequested, Supervisor
from shared.settings import load_config
from shared.tiny import resolve_model


class Launcher(Supervisor):
    def __init__(self, config: ServeConfig, log_dir: Path | None = None) -> None:
        super().__init__(config, log_dir)
        self._redis_dir: str | None = None   # the private Redis' files, removed on stop

    # -- start ------------------------------------------------------------------------------------------------------

    def start_redis(self) -> tuple[str, str]:
        """(cache URL, jobs URL): the Redis given (both), or two private ones. The cache is bounded and evicts the
        least recently used embeddings; the jobs Redis evicts nothing (the stream, locks and heartbeats must stay).
        Embeddings then need no expiry."""
        if self.config.redis not in ("auto", "private"):
            return self.config.redis, self.config.redis
        if self.config.redis == "auto" and redis_answers(LOCAL_REDIS):
            return LOCAL_REDIS, LOCAL_REDIS
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("no Redis answers on 127.0.0.1:6379 and redis-server is not installed")
        self._redis_dir = tempfile.mkdtemp(prefix="pixtral-redis-")
        jobs = self._start_private_redis("redis_jobs", server, ("--maxmemory-policy", "noeviction"))
        cache = self._start_private_redis("redis", server, (
            "--maxmemory", f"{self.cache_memory_mib()}mb", "--maxmemory-policy", "allkeys-lru",
            "--maxmemory-samples", "10"))
        return cache, jobs

    def cache_memory_mib(self) -> int:
        if self.config.cache_memory_mib:
            return self.config.cache_memory_mib
        return max(64, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8 >> 20)

    def _start_private_redis(self, name: str, server: str, settings: tuple[str, ...]) -> str:
        port = free_port()
        self.spawn(ChildSpec(name, (server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", self._redis_dir, "--logfile", "",
                                    "--loglevel", "warning", *settings), REDIS_STAGE))
        url = f"redis://127.0.0.1:{port}/0"
        self.wait_for(name, lambda: redis_answers(url))
        return url

    def metrics_ports(self) -> dict[str, int]:
        """Child name -> its metrics port: the gateway's --metrics-port, then the decoders', then the vision
        workers' (0 for all with --metrics-port 0)."""
        c = self.config
        names = ["gateway", *(f"decoder{i}" for i in range(c.decoders)),
                 *(f"vision{i}" for i in range(c.vision_workers))]
        return {name: c.metrics_port + index if c.metrics_port else 0 for index, name in enumerate(names)}

    def start(self) -> str:
        c = self.config
        metrics = self.metrics_ports()
        if c.http_port and not is_bindable(c.http_port):
            raise SystemExit(f"HTTP port {c.http_port} is in use (--http-port; 0: none)")
        for name, port in metrics.items():
            if port and not is_bindable(port):
                raise SystemExit(f"metrics port {port} of {name} is in use (--metrics-port {c.metrics_port} takes "
                                 f"{len(metrics)} ports in a row; 0: none)")
        model = str(resolve_model(c.model))  # made once here, not raced by the children
        cache_url, jobs_url = self.start_redis()
        if c.metrics_port:
            metrics_host = "127.0.0.1" if c.host in ("0.0.0.0", "::", "") else c.host
            for name, port in metrics.items():
                print(f"metrics {name} http://{metrics_host}:{port}/metrics", file=sys.stderr, flush=True)
        python = [sys.executable, "-m"]
        cache = ("--cache-redis", cache_url) if cache_url != jobs_url else ()
        common = ["--model", model, "--redis", jobs_url, *cache, "--drain-grace-s", f"{c.drain_grace_s:g}"]
        # On CPU the model processes share the cores: give each its share of torch threads.
        threads = ["--torch-threads", str(max(1, (os.cpu_count() or 1) // (c.decoders + c.vision_workers)))] \
            if c.device == "cpu" else []
        # On CUDA each model process sees one GPU; decoders sharing one split the memory their KV caches are sized
        # from (vision workers use little).
        try:
            placement = place(visible_gpus(c.gpus), c.decoders, c.vision_workers, c.vision_gpus) \
                if c.device == "cuda" else None
        except ValueError as error:
            raise SystemExit(f"pixtral-serve: {error}") from None
        precision = ["--quantization", c.quantization, "--kv-cache-dtype", c.kv_cache_dtype]
        decoder_addresses, worker_addresses = [], []
        for index in range(c.decoders):
            name, port = f"decoder{index}", free_port()
            memory, env = [], ()
            if placement is not None:
                gpu, share = placement.decoders[index]
                memory, env = ["--gpu-memory-utilization", f"{share:g}"], (("CUDA_VISIBLE_DEVICES", gpu),)
            self.spawn(ChildSpec(name, (*python, "services.decoder", *common, "--port", str(port), "--host",
                                        "127.0.0.1", "--device", c.device, "--metrics-port", str(metrics[name]),
                                        *threads, *memory, *precision), WORKER_STAGE, env))
            decoder_addresses.append(f"127.0.0.1:{port}")
        for index in range(c.vision_workers):
            name, port = f"vision{index}", free_port()
            # The consumer name outlives a restart: the new process takes up the jobs the old one held.
            self.spawn(ChildSpec(name, (*python, "services.vision", *common, "--port", str(port), "--host",
                                        "127.0.0.1", "--device", c.device, "--consumer",
                                        f"vision-{index}-{os.getpid()}", "--metrics-port", str(metrics[name]),
                                        *threads), WORKER_STAGE,
                                 () if placement is None else (("CUDA_VISIBLE_DEVICES", placement.vision[index]),)))
            worker_addresses.append(f"127.0.0.1:{port}")
        for address in decoder_addresses + worker_addresses:
            self.wait_for(address, lambda address=address: is_serving(address))
        self.spawn(ChildSpec("gateway", (*python, "services.gateway", *common, "--port", str(c.port), "--host",
                                         c.host, "--decoder-addresses", ",".join(decoder_addresses),
                                         "--metrics-port", str(metrics["gateway"]), "--http-port", str(c.http_port)),
                             GATEWAY_STAGE))
        gateway = f"{c.host}:{c.port}"
        self.wait_for("gateway", lambda: is_serving(gateway))
        return gateway

    def stop(self) -> None:
        """Stops the children in order (Supervisor.stop), then removes the private Redis' folder."""
        super().stop()
        if self._redis_dir:
            shutil.rmtree(self._redis_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    config = load_config(ServeConfig, argv)
    launcher = Launcher(config)

    def on_signal(signum, frame):
        launcher.is_stop_requested = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        gateway = launcher.start()
        print(f"ready {gateway}", flush=True)
        if config.http_port:
            http_host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
            print(f"http http://{http_host}:{config.http_port}/v1", flush=True)
        launcher.serve_forever()
    except StopRequested:
        return 0
    except SystemExit as error:
        print(f"pixtral-serve: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        launcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
