"""`python -m services.vision`: one vision worker (start as many as you like)."""

from __future__ import annotations

from services.vision.config import VisionConfig
from services.vision.wiring import build
from shared.role import run_role


def main() -> None:
    config = VisionConfig.load()
    run_role("vision", config, build, redis_blocking_s=config.read_block_ms / 1000)


if __name__ == "__main__":
    main()
