"""`python -m services.gateway`: the public gateway."""

from __future__ import annotations

import functools

from pixtral.v1 import gateway_pb2_grpc
from services.gateway.config import GatewayConfig
from services.gateway.server import GatewayServicer
from services.gateway.wiring import build
from shared.role import Service, run_role


def main() -> None:
    config = GatewayConfig.load()
    servicer = GatewayServicer()
    run_role("gateway", config, functools.partial(build, servicer), reflection=True,
             services=[Service(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, "pixtral.v1.Gateway")],
             max_message_bytes=config.max_message_bytes)


if __name__ == "__main__":
    main()
