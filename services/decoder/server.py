"""gRPC transport of the decoder: proto <-> domain, nothing else."""

from __future__ import annotations

from contextlib import aclosing

from pixtral.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc
from services.decoder.service import DecoderService
from services.decoder.sequence import FinishReason
from shared.errors import Unavailable
from shared.generation import GenerateRequest, ImageRef
from shared.grpc_server import map_errors
from shared.logs import request_id_var
from shared.sampling import SamplingParams

FINISH_REASONS = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


_NEUTRAL = SamplingParams(max_tokens=0)


def sampling_from_pb(sampling: common_pb2.SamplingParams) -> SamplingParams:
    """The resolved form the gateway sent; a field left unset is the neutral value (SamplingParams' default)."""
    def get(name: str):
        return getattr(sampling, name) if sampling.HasField(name) else getattr(_NEUTRAL, name)
    return SamplingParams(max_tokens=get("max_tokens"), temperature=get("temperature"), top_p=get("top_p"),
                          top_k=get("top_k"), seed=get("seed"))


def request_from_pb(request: decoder_pb2.GenerateRequest) -> GenerateRequest:
    return GenerateRequest(
        request_id=request.request_id or "anonymous", prompt_token_ids=list(request.prompt_token_ids),
        images=[ImageRef(image.sha256, image.grid_height, image.grid_width) for image in request.images],
        sampling=sampling_from_pb(request.sampling))


class DecoderServicer(decoder_pb2_grpc.DecoderServicer):
    def __init__(self) -> None:
        self.service: DecoderService | None = None  # set once the model is loaded

    def _ready(self) -> DecoderService:
        if self.service is None:
            raise Unavailable("decoder is loading its model")
        return self.service

    @map_errors
    async def Generate(self, request, context):
        request_id_var.set(request.request_id)
        service = self._ready()
        async with aclosing(service.generate(request_from_pb(request))) as outputs:
            async for output in outputs:   # closed on the way out: that aborts the sequence at once
                yield decoder_pb2.GenerateResponse(token_ids=output.token_ids,
                                                   finish_reason=FINISH_REASONS[output.finish_reason])

    @map_errors
    async def Info(self, request, context):
        info = self._ready().info()
        return decoder_pb2.InfoResponse(**{name: getattr(info, name) for name in (
            "max_model_len", "vocab_size", "block_size", "model_fingerprint", "prefix_caching", "max_num_seqs",
            "max_queued", "num_unfinished", "num_blocks", "num_free_blocks")})
