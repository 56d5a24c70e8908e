"""The decoder hop's messages, converted between protos and the gateway's types: a GenerateRequest to send, a
decoder's Info and its streamed outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass

from pixtral.v1 import common_pb2, decoder_pb2
from shared.generation import DecoderInfo, GenerateRequest, Logprobs

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
    common_pb2.FINISH_REASON_ERROR: "error",
}


def request_to_pb(request: GenerateRequest) -> decoder_pb2.GenerateRequest:
    s = request.sampling
    sampling = common_pb2.SamplingParams(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
        min_p=s.min_p, repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty, logit_bias=dict(s.logit_bias), min_tokens=s.min_tokens,
        stop_token_ids=s.stop_token_ids, ignore_eos=s.ignore_eos, logprobs=s.logprobs, top_logprobs=s.top_logprobs)
    message = decoder_pb2.GenerateRequest(
        request_id=request.request_id, prompt_token_ids=request.prompt_token_ids, sampling=sampling,
        images=[decoder_pb2.ImageRef(sha256=image.sha256, grid_height=image.grid_height,
                                     grid_width=image.grid_width) for image in request.images],
        n=request.n, seeds=request.seeds)
    if request.format is not None:
        spec = request.format.spec
        message.format.kind = request.format.kind
        message.format.spec = json.dumps(list(spec)) if isinstance(spec, tuple) else spec
    return message


def info_from_pb(response: decoder_pb2.InfoResponse) -> DecoderInfo:
    return DecoderInfo(**{name: getattr(response, name) for name in DecoderInfo.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class DecodeOutput:
    token_ids: list[int]
    finish_reason: str | None   # "stop", "length", "cancelled" or "error" on a completion's last output
    index: int = 0              # the completion
    logprobs: tuple[Logprobs, ...] = ()   # one per token, when asked
    cached_prompt_tokens: int = 0         # on a completion's last output


def output_from_pb(response: decoder_pb2.GenerateResponse) -> DecodeOutput:
    return DecodeOutput(
        list(response.token_ids), FINISH_REASONS.get(response.finish_reason), response.index,
        tuple(Logprobs(entry.token_id, entry.logprob, tuple(top.token_id for top in entry.top_logprobs),
                       tuple(top.logprob for top in entry.top_logprobs)) for entry in response.logprobs),
        response.cached_prompt_tokens)
