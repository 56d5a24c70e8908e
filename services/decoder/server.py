"""gRPC transport of the decoder: proto <-> domain, nothing else."""

from __future__ import annotations

import dataclasses
import json
from contextlib import aclosing

from pixtral.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc
from services.decoder.outputs import EngineOutput
from services.decoder.service import DecoderService
from services.decoder.sequence import FinishReason
from shared.errors import InvalidRequest, Unavailable
from shared.generation import GenerateRequest, ImageRef
from shared.grpc_server import map_errors
from shared.logs import request_id_var
from shared.sampling import SamplingParams
from shared.structured_output import ResponseFormat

FINISH_REASONS = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


_NEUTRAL = SamplingParams(max_tokens=0)


_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed", "min_p", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "min_tokens", "ignore_eos", "logprobs", "top_logprobs")


def sampling_from_pb(sampling: common_pb2.SamplingParams) -> SamplingParams:
    """The resolved form the gateway sent; a field left unset is the neutral value (SamplingParams' default)."""
    values = {name: getattr(sampling, name) if sampling.HasField(name) else getattr(_NEUTRAL, name)
              for name in _OPTIONAL}
    return SamplingParams(**values, logit_bias=tuple(sorted(sampling.logit_bias.items())),
                          stop_token_ids=tuple(sampling.stop_token_ids))


def format_from_pb(request: decoder_pb2.GenerateRequest) -> ResponseFormat | None:
    if not request.HasField("format"):
        return None
    kind, spec = request.format.kind, request.format.spec
    try:
        return ResponseFormat(kind, tuple(json.loads(spec)) if kind == "choice" else spec)
    except (ValueError, TypeError) as error:   # FormatError is a ValueError
        raise InvalidRequest("format", str(error)) from None


def request_from_pb(request: decoder_pb2.GenerateRequest) -> GenerateRequest:
    return GenerateRequest(
        request_id=request.request_id or "anonymous", prompt_token_ids=list(request.prompt_token_ids),
        images=[ImageRef(image.sha256, image.grid_height, image.grid_width) for image in request.images],
        sampling=sampling_from_pb(request.sampling), n=request.n or 1, seeds=tuple(request.seeds),
        format=format_from_pb(request))


def output_to_pb(index: int, output: EngineOutput) -> decoder_pb2.GenerateResponse:
    response = decoder_pb2.GenerateResponse(token_ids=output.token_ids, index=index,
                                            finish_reason=FINISH_REASONS[output.finish_reason])
    for entry in output.logprobs:
        response.logprobs.add(token_id=entry.token_id, logprob=entry.logprob, top_logprobs=[
            common_pb2.TopLogprob(token_id=token, logprob=logprob)
            for token, logprob in zip(entry.top_token_ids, entry.top_logprobs)])
    if output.finish_reason is not None:
        response.cached_prompt_tokens = output.num_cached_prompt_tokens
    return response


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
            async for index, output in outputs:   # closed on the way out: that aborts the sequences at once
                yield output_to_pb(index, output)

    @map_errors
    async def Info(self, request, context):
        info = self._ready().info()
        return decoder_pb2.InfoResponse(**{field.name: getattr(info, field.name)
                                           for field in dataclasses.fields(info)})
