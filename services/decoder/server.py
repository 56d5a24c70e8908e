"""gRPC transport of the decoder: proto <-> domain, nothing else."""

from __future__ import annotations

from contextlib import aclosing

from pixtral.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc
from services.decoder.service import DecoderService, GenerateRequest, ImageRef
from services.decoder.sequence import FinishReason
from shared.errors import Unavailable
from shared.grpc_server import map_errors
from shared.logs import request_id_var

FINISH_REASONS = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


def request_from_pb(request: decoder_pb2.GenerateRequest) -> GenerateRequest:
    sampling = request.sampling
    return GenerateRequest(
        request_id=request.request_id or "anonymous",
        prompt_token_ids=list(request.prompt_token_ids),
        images=[ImageRef(image.sha256, image.grid_height, image.grid_width) for image in request.images],
        max_tokens=sampling.max_tokens if sampling.HasField("max_tokens") else 256,
        temperature=sampling.temperature if sampling.HasField("temperature") else 1.0,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        top_k=sampling.top_k,
        seed=sampling.seed if sampling.HasField("seed") else None,
    )


class DecoderServicer(decoder_pb2_grpc.DecoderServicer):
    def __init__(self) -> None:
        self.service: DecoderService | None = None  # set once the model is loaded

    @map_errors
    async def Generate(self, request, context):
        request_id_var.set(request.request_id)
        if self.service is None:
            raise Unavailable("decoder is loading its model")
        async with aclosing(self.service.generate(request_from_pb(request))) as outputs:
            async for output in outputs:   # closed on the way out: that aborts the sequence at once
                yield decoder_pb2.GenerateResponse(token_ids=output.token_ids,
                                                   finish_reason=FINISH_REASONS[output.finish_reason])
