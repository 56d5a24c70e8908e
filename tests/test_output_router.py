"""The decoder's OutputRouter: outputs pushed from the engine thread reach each request's queue, all of them and
in order, however the pushes and the loop's drains interleave."""

from __future__ import annotations

import asyncio
import threading

from services.decoder.outputs import EngineOutput
from services.decoder.sequence import FinishReason
from services.decoder.service import OutputRouter

NUM_QUEUES = 3
NUM_OUTPUTS = 5_000


def test_every_output_pushed_from_another_thread_arrives_in_order():
    async def main() -> list[list[int]]:
        router = OutputRouter(asyncio.get_running_loop())
        queues = [asyncio.Queue() for _ in range(NUM_QUEUES)]
        sinks = [router.sink(queue) for queue in queues]

        def engine() -> None:
            for step in range(NUM_OUTPUTS):
                sinks[step % NUM_QUEUES](EngineOutput(str(step % NUM_QUEUES), [step], None))

        thread = threading.Thread(target=engine)
        thread.start()
        received: list[list[int]] = [[] for _ in range(NUM_QUEUES)]
        for index, queue in enumerate(queues):
            expected = len(range(index, NUM_OUTPUTS, NUM_QUEUES))
            while len(received[index]) < expected:
                received[index].extend((await asyncio.wait_for(queue.get(), timeout=60)).token_ids)
        thread.join()
        return received

    received = asyncio.run(main())
    for index in range(NUM_QUEUES):
        assert received[index] == list(range(index, NUM_OUTPUTS, NUM_QUEUES))


def test_a_stream_with_an_interval_wakes_its_handler_only_for_the_messages_it_sends():
    async def main() -> list[list[int]]:
        router = OutputRouter(asyncio.get_running_loop())
        queue: asyncio.Queue = asyncio.Queue()
        sink = router.sink(queue, interval=4)

        def engine() -> None:
            for token in range(1, 11):
                sink(EngineOutput("a", [token], FinishReason.LENGTH if token == 10 else None))

        thread = threading.Thread(target=engine)
        thread.start()
        thread.join()
        messages: list[list[int]] = []
        while not messages or messages[-1][-1] != 10:
            messages.append((await asyncio.wait_for(queue.get(), timeout=60)).token_ids)
        return messages

    # the first token at once, then runs of four, the last with what was held: nothing else reached the queue
    assert asyncio.run(main()) == [[1], [2, 3, 4, 5], [6, 7, 8, 9], [10]]
