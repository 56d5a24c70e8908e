"""The decoder's request logic between the transport and the engine: validation, image features, streaming."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator

import torch

from services.decoder.engine import Engine, EngineOutput
from services.decoder.features import FeatureStore
from services.decoder.model import TextModelSpec
from services.decoder.sequence import FinishReason, Sequence
from services.decoder.step_inputs import ImageInputs
from shared.errors import InvalidRequest, Unavailable
from shared.generation import DecoderInfo, GenerateRequest, ImageRef


class OutputRouter:
    """Hands engine outputs (from the engine thread) to each request's asyncio queue with one event-loop wake-up
    per engine step instead of one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, EngineOutput]] = []
        self._is_scheduled = False

    def sink(self, queue: asyncio.Queue):
        def push(output: EngineOutput) -> None:
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
                 fingerprint: str, prefix_caching: bool) -> None:
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
                           num_free_blocks=stats.num_free_blocks)

    def _validate(self, request: GenerateRequest) -> None:
        ids = request.prompt_token_ids
        if not ids:
            raise InvalidRequest("prompt_token_ids", "empty")
        if max(ids) >= self.spec.vocab_size:
            raise InvalidRequest("prompt_token_ids", f"id {max(ids)} outside the vocabulary of {self.spec.vocab_size}")
        max_tokens = request.sampling.max_tokens
        if max_tokens <= 0:
            raise InvalidRequest("sampling.max_tokens", f"must be > 0, got {max_tokens}")
        if len(ids) + max_tokens > self.max_model_len:
            raise InvalidRequest("sampling.max_tokens", f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) "
                                 f"exceeds the context length of {self.max_model_len}")
        num_image_tokens = sum(1 for token in ids if token == self.spec.image_token_id)
        num_rows = sum(image.num_rows for image in request.images)
        if num_image_tokens != num_rows:
            raise InvalidRequest("images", f"{num_rows} embedding rows for {num_image_tokens} [IMG] tokens")

    async def _image_inputs(self, request: GenerateRequest) -> ImageInputs | None:
        if not request.images:
            return None
        features = await self.features.fetch(
            [(image.sha256, (image.grid_height, image.grid_width)) for image in request.images])
        ids = torch.tensor(request.prompt_token_ids)
        positions = torch.nonzero(ids == self.spec.image_token_id).flatten()
        return ImageInputs(features=features, positions=positions)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]:
        """Streams the engine's outputs; the last one has finish_reason. Cancelling the iteration aborts."""
        self._validate(request)
        # Admitted (or refused) before the image features are fetched: a flood must not cost their memory.
        self.engine.reserve()
        try:
            images = await self._image_inputs(request)
        except BaseException:
            self.engine.release()
            raise
        arrival = next(self._arrivals)
        seq = Sequence(request_id=f"{request.request_id}#{arrival}", token_ids=list(request.prompt_token_ids),
                       num_prompt_tokens=len(request.prompt_token_ids), sampling=request.sampling,
                       max_model_len=self.max_model_len, arrival=arrival, images=images,
                       image_spans=image_spans(request.images, images), eos_token_id=self.spec.eos_token_id)
        if self._router is None:
            self._router = OutputRouter(asyncio.get_running_loop())
        outputs: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self.engine.add(seq, self._router.sink(outputs), is_reserved=True)
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                if output.finish_reason is None and not outputs.empty():
                    # the caller fell behind the engine: send what has piled up as one message
                    token_ids = list(output.token_ids)
                    while output.finish_reason is None and not outputs.empty():
                        output = outputs.get_nowait()
                        token_ids += output.token_ids
                    output = EngineOutput(output.request_id, token_ids, output.finish_reason, output.error)
                finished = output.finish_reason is not None
                yield output
                if output.finish_reason is FinishReason.ERROR:
                    raise Unavailable(f"decoder failed during generation: {output.error}")
        finally:
            if not finished:
                self.engine.abort(seq.request_id)
