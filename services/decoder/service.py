"""The decoder's request logic between the transport and the engine: validation, image features, streaming."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator
from dataclasses import replace

import torch

from services.decoder.engine import Engine
from services.decoder.features import FeatureStore
from services.decoder.model import TextModelSpec
from services.decoder.outputs import EngineOutput
from services.decoder.sequence import FinishReason, Sequence
from services.decoder.step_inputs import ImageInputs
from shared.errors import InvalidRequest, Unavailable
from shared.generation import DecoderInfo, GenerateRequest, ImageRef
from shared.sampling import MAX_TOP_LOGPROBS
from shared.structured_output import FormatCompiler, FormatError


class OutputRouter:
    """Hands engine outputs (from the engine thread) to each request's asyncio queue with one event-loop wake-up
    per engine step instead of one per token. A stream's tokens held back for its next message (`interval`) are
    held here, on the engine thread, so that its handler wakes only for a message it sends."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, EngineOutput]] = []
        self._is_scheduled = False

    def sink(self, queue: asyncio.Queue, interval: int = 1):
        runs = MessageRuns(interval)   # called from the engine thread only, as the sink is

        def push(output: EngineOutput) -> None:
            output = runs.take(output)
            if output is None:
                return
            with self._lock:
                self._pending.append((queue, output))
                if self._is_scheduled:
                    return
                self._is_scheduled = True
            self.loop.call_soon_threadsafe(self._flush)
        return push

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending, self._is_scheduled = self._pending, [], False
        for queue, output in pending:
            queue.put_nowait(output)


def image_spans(refs: list[ImageRef], images: ImageInputs | None) -> tuple[tuple[int, int, str], ...]:
    """(first, end, sha256) of each image's [IMG] positions: the images' identity for the prefix cache."""
    if images is None:
        return ()
    spans, row = [], 0
    for ref in refs:
        spans.append((int(images.positions[row]), int(images.positions[row + ref.num_rows - 1]) + 1, ref.sha256))
        row += ref.num_rows
    return tuple(spans)


class DecoderService:
    def __init__(self, engine: Engine, features: FeatureStore, spec: TextModelSpec, max_model_len: int,
                 fingerprint: str, prefix_caching: bool, formats: FormatCompiler, stream_interval: int = 1) -> None:
        self.formats = formats   # compiles the output formats requests name (each once, cached)
        # Tokens a message carries at least, but a completion's first and last: fewer messages cost both event
        # loops (this one's and the gateway's) less host time per token.
        self.stream_interval = stream_interval
        self.engine = engine
        self.features = features
        self.spec = spec
        self.max_model_len = max_model_len
        self.fingerprint = fingerprint
        self.prefix_caching = prefix_caching
        self._arrivals = itertools.count()
        self._router: OutputRouter | None = None

    def info(self) -> DecoderInfo:
        stats, admission = self.engine.stats(), self.engine.admission
        return DecoderInfo(max_model_len=self.max_model_len, vocab_size=self.spec.vocab_size,
                           block_size=self.engine.scheduler.block_manager.block_size,
                           model_fingerprint=self.fingerprint, prefix_caching=self.prefix_caching,
                           max_num_seqs=admission.max_num_seqs, max_queued=admission.max_queued,
                           num_unfinished=admission.num_unfinished, num_blocks=stats.num_blocks,
                           num_free_blocks=stats.num_free_blocks, num_running=stats.num_running,
                           num_waiting=stats.num_waiting, num_prefix_cached_blocks=stats.num_prefix_cached_blocks,
                           num_prefix_queried_tokens=stats.num_prefix_queried_tokens,
                           num_prefix_hit_tokens=stats.num_prefix_hit_tokens)

    def _validate(self, request: GenerateRequest) -> None:
        ids, sampling = request.prompt_token_ids, request.sampling
        if not ids:
            raise InvalidRequest("prompt_token_ids", "empty")
        if max(ids) >= self.spec.vocab_size:
            raise InvalidRequest("prompt_token_ids", f"id {max(ids)} outside the vocabulary of {self.spec.vocab_size}")
        max_tokens = sampling.max_tokens
        if max_tokens <= 0:
            raise InvalidRequest("sampling.max_tokens", f"must be > 0, got {max_tokens}")
        if len(ids) + max_tokens > self.max_model_len:
            raise InvalidRequest("sampling.max_tokens", f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) "
                                 f"exceeds the context length of {self.max_model_len}")
        num_image_tokens = sum(1 for token in ids if token == self.spec.image_token_id)
        num_rows = sum(image.num_rows for image in request.images)
        if num_image_tokens != num_rows:
            raise InvalidRequest("images", f"{num_rows} embedding rows for {num_image_tokens} [IMG] tokens")
        if not 1 <= request.n <= self.engine.admission.max_num_seqs:
            raise InvalidRequest("n", f"must be in [1, {self.engine.admission.max_num_seqs}], got {request.n}")
        if request.seeds and len(request.seeds) != request.n:
            raise InvalidRequest("seeds", f"{len(request.seeds)} seeds for {request.n} completions")
        for name, token_ids in (("sampling.logit_bias", [token for token, _ in sampling.logit_bias]),
                                ("sampling.stop_token_ids", sampling.stop_token_ids)):
            if token_ids and max(token_ids) >= self.spec.vocab_size:
                raise InvalidRequest(name, f"id {max(token_ids)} outside the vocabulary of {self.spec.vocab_size}")
        if not 0 <= sampling.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest("sampling.top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")

    async def _image_inputs(self, request: GenerateRequest) -> ImageInputs | None:
        if not request.images:
            return None
        features = await self.features.fetch(
            [(image.sha256, (image.grid_height, image.grid_width)) for image in request.images])
        ids = torch.tensor(request.prompt_token_ids)
        positions = torch.nonzero(ids == self.spec.image_token_id).flatten()
        return ImageInputs(features=features, positions=positions)

    async def _format(self, request: GenerateRequest):
        """The output's compiled format (compiled once per format text, off the event loop), or None."""
        if request.format is None:
            return None
        try:
            return await asyncio.to_thread(self.formats.compile, request.format)
        except FormatError as error:
            raise InvalidRequest("format", str(error)) from None

    def _sequences(self, request: GenerateRequest, images: ImageInputs | None, compiled) -> list[Sequence]:
        """The request's n completions: each its own seed and grammar matcher. With the prefix cache, the others
        wait for the first one's prompt blocks and share them (the scheduler)."""
        arrival = next(self._arrivals)
        seqs: list[Sequence] = []
        for index in range(request.n):
            seed = request.seeds[index] if request.seeds else request.sampling.seed
            seqs.append(Sequence(
                request_id=f"{request.request_id}#{arrival}.{index}", token_ids=list(request.prompt_token_ids),
                num_prompt_tokens=len(request.prompt_token_ids), sampling=replace(request.sampling, seed=seed),
                max_model_len=self.max_model_len, arrival=arrival, images=images,
                image_spans=image_spans(request.images, images), eos_token_id=self.spec.eos_token_id,
                constraint=compiled.matcher() if compiled is not None else None, choice_index=index))
        return seqs

    async def generate(self, request: GenerateRequest) -> AsyncIterator[tuple[int, EngineOutput]]:
        """Streams (completion index, engine output); each completion's last output has finish_reason. Cancelling
        the iteration aborts every completion."""
        self._validate(request)
        compiled = await self._format(request)
        # Admitted (or refused) before the image features are fetched: a flood must not cost their memory.
        num_reserved = 0
        try:
            for _ in range(request.n):
                self.engine.admission.reserve()
                num_reserved += 1
            images = await self._image_inputs(request)
        except BaseException:
            for _ in range(num_reserved):
                self.engine.admission.release()
            raise
        seqs = self._sequences(request, images, compiled)
        index_of = {seq.request_id: seq.choice_index for seq in seqs}
        if self._router is None:
            self._router = OutputRouter(asyncio.get_running_loop())
        outputs: asyncio.Queue[EngineOutput] = asyncio.Queue()
        sink = self._router.sink(outputs, self.stream_interval)
        for seq in seqs:
            self.engine.add(seq, sink, is_reserved=True)
        unfinished = set(index_of)
        try:
            while unfinished:
                for output in _coalesced(await outputs.get(), outputs):
                    if output.finish_reason is not None:
                        unfinished.discard(output.request_id)
                    yield index_of[output.request_id], output
                    if output.finish_reason is FinishReason.ERROR:
                        raise Unavailable(f"decoder failed during generation: {output.error}")
        finally:
            for request_id in unfinished:
                self.engine.abort(request_id)


def _coalesced(first: EngineOutput, queue: asyncio.Queue) -> list[EngineOutput]:
    """The outputs that piled up while the caller was behind the engine, each completion's run of them merged into
    one message (fewer messages: what a slow reader needs)."""
    merged: list[EngineOutput] = [first]
    while not queue.empty():
        output = queue.get_nowait()
        if merged[-1].request_id == output.request_id and merged[-1].finish_reason is None:
            merged[-1] = _merged(merged[-1], output)
        else:
            merged.append(output)
    return merged


class MessageRuns:
    """A stream's outputs as messages of at least `interval` new tokens each; a completion's first output (the
    time to first token is not held back) and its last go out as they come."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self._held: dict[str, EngineOutput] = {}   # per completion: tokens kept back for its next message
        self._started: set[str] = set()             # completions whose first message went out

    def take(self, output: EngineOutput) -> EngineOutput | None:
        """The message to send now, with the tokens held back before it; None: held back too."""
        held = self._held.pop(output.request_id, None)
        if held is not None:
            output = _merged(held, output)
        if output.finish_reason is None and output.request_id in self._started and \
                len(output.token_ids) < self.interval:
            self._held[output.request_id] = output
            return None
        self._started.add(output.request_id)
        return output


def _merged(earlier: EngineOutput, later: EngineOutput) -> EngineOutput:
    """Two consecutive outputs of one completion as one."""
    return EngineOutput(later.request_id, earlier.token_ids + later.token_ids, later.finish_reason, later.error,
                        earlier.logprobs + later.logprobs, later.num_cached_prompt_tokens)
