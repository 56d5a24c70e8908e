"""Server-streaming gRPC handlers run as coroutines that write each message, rather than as generators."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc


async def write_all(responses: AsyncIterator, context: grpc.aio.ServicerContext) -> None:
    """Writes every message of `responses` and closes it on every way out: its end, an error, a cancel.

    grpc iterates a generator handler itself, and when the call is cancelled between two messages it stops without
    closing the generator: the generator's finally blocks (ending the call to the decoder, counting the call as
    over) wait until it is garbage-collected. Here they run before the handler returns.
    """
    async with contextlib.aclosing(responses):
        async for response in responses:
            try:
                await context.write(response)
            except grpc.aio.BaseError as error:
                # The call is over under us (the client cancelled, its deadline passed, the connection or the
                # server went away): nobody is left to answer, so it ends as a cancelled call does.
                raise asyncio.CancelledError(f"write failed: {type(error).__name__}") from error
