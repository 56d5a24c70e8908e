"""A decoder started with `--stream-interval N` sends a stream's tokens in runs of at least N, its first and last
message excepted, and the tokens stay those of `generate`."""

from __future__ import annotations

import grpc
import pytest

from pixtral.v1 import common_pb2, gateway_pb2_grpc
from services.decoder.config import DecoderConfig
from services.decoder.outputs import EngineOutput
from services.decoder.sequence import FinishReason
from services.decoder.service import MessageRuns
from shared.settings import load_config
from tests.reference import assert_greedy_equal, chat_request, reference_generate
from tests.support import Stack

INTERVAL = 4
MAX_TOKENS = 14


@pytest.fixture(scope="module")
def interval_stack(tiny_model, redis_server, tmp_path_factory):
    running = Stack(tiny_model, redis_server.url, tmp_path_factory.mktemp("interval"), num_vision=0,
                    decoder_args=("--stream-interval", str(INTERVAL))).start()
    yield running
    running.stop()


def test_tokens_come_in_runs_of_the_interval_and_stay_exact(interval_stack, tiny_model):
    chat = [("user", ["Tell me a story."])]
    _, expected, logits = reference_generate(tiny_model, chat, MAX_TOKENS)
    request = chat_request(chat, max_tokens=MAX_TOKENS, temperature=0.0)
    with grpc.insecure_channel(interval_stack.gateway) as channel:
        responses = list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=120))
    runs = [len(response.token_ids) for response in responses if response.token_ids]
    # (The first message's size depends on how far the handler is behind: MessageRuns' test below pins it.)
    assert all(run >= INTERVAL for run in runs[1:-1]), runs
    num_tokens = responses[-1].usage.completion_tokens
    assert sum(runs) == num_tokens and len(runs) <= 1 + -(-(num_tokens - 1) // INTERVAL)
    assert_greedy_equal([token for response in responses for token in response.token_ids], expected, logits)
    assert responses[-1].finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)


def test_several_completions_each_keep_their_runs(interval_stack):
    request = chat_request([("user", ["Tell me a story."])], max_tokens=MAX_TOKENS, temperature=1.0, seed=3,
                           ignore_eos=True)
    request.n = 3
    with grpc.insecure_channel(interval_stack.gateway) as channel:
        responses = list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=120))
    for index in range(3):
        runs = [len(r.token_ids) for r in responses if r.index == index and r.token_ids]
        assert all(run >= INTERVAL for run in runs[1:-1]) and sum(runs) == MAX_TOKENS, runs


def test_the_first_output_and_the_last_go_out_at_once_the_others_in_runs():
    runs = MessageRuns(INTERVAL)

    def take(request_id: str, *token_ids: int, finish: FinishReason | None = None) -> list[int] | None:
        sent = runs.take(EngineOutput(request_id, list(token_ids), finish))
        return None if sent is None else sent.token_ids

    assert take("a", 1) == [1]   # the first token: at once
    assert take("b", 10, 11) == [10, 11]   # each completion's first output
    assert [take("a", token) for token in (2, 3, 4)] == [None, None, None]
    assert take("a", 5) == [2, 3, 4, 5]   # a run of INTERVAL
    assert take("b", 12, 13, 14, 15) == [12, 13, 14, 15]   # as many at once: not held
    assert take("a", 6) is None
    assert take("a", 7, finish=FinishReason.LENGTH) == [6, 7]   # the last: at once, with what was held


def test_the_interval_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        load_config(DecoderConfig, ["--stream-interval", "0"], {})
    assert "--stream-interval must be positive" in capsys.readouterr().err
