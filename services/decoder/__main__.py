"""`python -m services.decoder`: one decoder worker."""

from __future__ import annotations

import functools

from pixtral.v1 import decoder_pb2_grpc
from services.decoder.config import DecoderConfig
from services.decoder.wiring import build
from services.decoder.server import DecoderServicer
from shared.role import Service, run_role


def main() -> None:
    config = DecoderConfig.load()
    servicer = DecoderServicer()
    run_role("decoder", config, functools.partial(build, servicer),
             services=[Service(decoder_pb2_grpc.add_DecoderServicer_to_server, servicer, "pixtral.v1.Decoder")])


if __name__ == "__main__":
    main()
