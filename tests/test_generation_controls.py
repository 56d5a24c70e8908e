"""The generation controls through the running stack (float32, tiny checkpoint): logprobs, penalties, min_p,
logit_bias, min_tokens, stop token ids, ignore_eos, n completions and their seeds, cached prompt tokens, stop
reasons, each against transformers' LlavaForConditionalGeneration or a direct reference computation."""

from __future__ import annotations

import grpc
import pytest
import torch

from pixtral.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.decoder.top_k_top_p import gumbel_noise
from tests.reference import chat_request, encode_reference, llava, reference_generate
from tests.support import assert_status, image_bytes, noise_image

EOS = 2


def chat(gateway: str, request) -> list[gateway_pb2.ChatResponse]:
    with grpc.insecure_channel(gateway) as channel:
        return list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=120))


def tokens_of(responses, index: int = 0) -> list[int]:
    return [t for r in responses if r.index == index for t in r.token_ids]


def last_of(responses, index: int = 0):
    return [r for r in responses if r.index == index and r.finish_reason][-1]


@torch.inference_mode()
def reference_logits(model_dir, chat_turns, generated: list[int]) -> torch.Tensor:
    """transformers' next-token logits after the prompt and `generated` (float32, recomputed from scratch)."""
    encoded = encode_reference(chat_turns)
    kwargs = {}
    if encoded.images:
        image = torch.from_numpy(encoded.images[0])[None]
        kwargs = {"pixel_values": image, "image_sizes": torch.tensor([list(image.shape[2:])])}
    ids = torch.tensor([list(encoded.tokens) + generated])
    return llava(model_dir)(input_ids=ids, **kwargs).logits[0, -1].float()


def reference_greedy(model_dir, chat_turns, num_tokens: int, process) -> list[int]:
    """A greedy loop over transformers' logits, each step's logits processed by `process(logits, generated)`."""
    generated: list[int] = []
    for _ in range(num_tokens):
        logits = process(reference_logits(model_dir, chat_turns, generated), generated)
        generated.append(int(logits.argmax()))
    return generated


TURN = [("user", ["Describe the weather in three words."])]


def test_logprobs_are_the_log_softmax_of_transformers_logits_with_alternatives_in_order(stack, tiny_model):
    image = image_bytes(noise_image(48, 32, seed=81))
    turns = [("user", ["What is this?", image])]
    _, expected, logits = reference_generate(tiny_model, turns, 6)
    request = chat_request(turns, max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=5)
    responses = chat(stack.gateway, request)
    entries = [entry for r in responses for entry in r.logprobs]
    assert tokens_of(responses) == expected and len(entries) == 6
    reference = logits.log_softmax(-1)
    for step, entry in enumerate(entries):
        assert entry.token_id == expected[step]
        assert abs(entry.logprob - float(reference[step, expected[step]])) < 1e-4
        top = reference[step].topk(5)
        assert [alt.token_id for alt in entry.top_logprobs] == top.indices.tolist()
        assert max(abs(alt.logprob - value) for alt, value in zip(entry.top_logprobs, top.values.tolist())) < 1e-4
        assert all(alt.text for alt in entry.top_logprobs if alt.token_id >= 1000)
        # the token's own text: its alternative's, and (greedy, one token a message) the message's text
        assert entry.text == entry.top_logprobs[0].text
    assert "".join(entry.text for entry in entries) == "".join(r.text for r in responses)


def test_greedy_with_repetition_penalty_equals_transformers_generate(stack, tiny_model):
    encoded = encode_reference(TURN)
    plain = tokens_of(chat(stack.gateway, chat_request(TURN, max_tokens=12, temperature=0.0)))
    outputs = []
    for penalty in (0.5, 1.8):   # below 1 it favours the tokens seen (the tiny model repeats none by itself)
        out = llava(tiny_model).generate(input_ids=torch.tensor([encoded.tokens]), max_new_tokens=12,
                                         do_sample=False, repetition_penalty=penalty)
        expected = out[0, len(encoded.tokens):].tolist()
        responses = chat(stack.gateway, chat_request(TURN, max_tokens=12, temperature=0.0,
                                                     repetition_penalty=penalty))
        assert tokens_of(responses) == expected, penalty
        outputs.append(expected)
    assert outputs[0] != plain   # the penalty changed something


def test_penalties_bias_and_min_tokens_equal_a_direct_reference(stack, tiny_model):
    first = reference_greedy(tiny_model, TURN, 1, lambda logits, _: logits)[0]
    boosted, banned = 5000, 7000   # ordinary text tokens

    def process(logits, generated):
        logits = logits.clone()
        logits[boosted] += 4.0
        logits[banned] -= 100.0
        if len(generated) < 3:
            logits[[first, EOS]] = float("-inf")   # min_tokens: the stop token id and EOS cannot end it yet
        for token in set(generated):
            logits[token] -= 0.7 + 0.4 * generated.count(token)   # presence + frequency * count
        return logits

    expected = reference_greedy(tiny_model, TURN, 10, process)
    if first in expected:
        expected = expected[:expected.index(first) + 1]   # it stops after its stop token id, once allowed
    request = chat_request(TURN, max_tokens=10, temperature=0.0, presence_penalty=0.7, frequency_penalty=0.4,
                           logit_bias={boosted: 4.0, banned: -100.0}, min_tokens=3, stop_token_ids=[first])
    responses = chat(stack.gateway, request)
    assert tokens_of(responses) == expected
    assert first not in tokens_of(responses)[:3]


def test_min_p_sampling_draws_what_a_direct_reference_draws(stack, tiny_model):
    seed, min_p, temperature = 1234, 0.05, 1.5
    generated: list[int] = []
    for step in range(6):
        logits = reference_logits(tiny_model, TURN, generated) / temperature
        logits[logits < logits.max() + torch.tensor(min_p).log()] = float("-inf")
        noise = gumbel_noise(torch.tensor([seed]), torch.tensor([step]), logits.shape[0])[0]
        generated.append(int((logits + noise).argmax()))
    request = chat_request(TURN, max_tokens=6, temperature=temperature, min_p=min_p, seed=seed)
    assert tokens_of(chat(stack.gateway, request)) == generated


def test_stop_reasons_and_ignore_eos(stack):
    responses = chat(stack.gateway, chat_request(TURN, max_tokens=8, temperature=0.0, logit_bias={EOS: 100.0}))
    assert tokens_of(responses) == [EOS] and last_of(responses).finish_reason == common_pb2.FINISH_REASON_STOP
    assert last_of(responses).stop_reason.token_id == EOS
    responses = chat(stack.gateway, chat_request(TURN, max_tokens=5, temperature=0.0, logit_bias={EOS: 100.0},
                                                 ignore_eos=True))
    assert tokens_of(responses) == [EOS] * 5 and last_of(responses).finish_reason == common_pb2.FINISH_REASON_LENGTH
    plain = tokens_of(chat(stack.gateway, chat_request(TURN, max_tokens=6, temperature=0.0)))
    responses = chat(stack.gateway, chat_request(TURN, max_tokens=6, temperature=0.0, stop_token_ids=[plain[2]]))
    assert tokens_of(responses) == plain[:plain.index(plain[2]) + 1]
    assert last_of(responses).stop_reason.token_id == plain[2]
    text = "".join(r.text for r in chat(stack.gateway, chat_request(TURN, max_tokens=6, temperature=0.0)))
    stop = text[len(text) // 2:len(text) // 2 + 2]
    responses = chat(stack.gateway, chat_request(TURN, max_tokens=6, temperature=0.0, stop=[stop]))
    assert last_of(responses).stop_reason.stop == stop and "".join(r.text for r in responses) == \
        text[:text.index(stop)]


def test_n_completions_each_reproducible_from_its_reported_seed(stack):
    image = image_bytes(noise_image(40, 40, seed=82))
    turns = [("user", ["Tell me a story about this.", image])]
    request = chat_request(turns, max_tokens=8, temperature=1.0, seed=11)
    request.n = 3
    responses = chat(stack.gateway, request)
    assert {r.index for r in responses} == {0, 1, 2}
    seeds = [last_of(responses, index).seed for index in range(3)]
    assert seeds[0] == 11 and len(set(seeds)) == 3
    completions = [tokens_of(responses, index) for index in range(3)]
    assert len({tuple(c) for c in completions}) > 1   # different seeds, different samples
    assert responses[-1].usage.completion_tokens == sum(len(c) for c in completions)
    for index in range(3):
        alone = chat(stack.gateway, chat_request(turns, max_tokens=8, temperature=1.0, seed=seeds[index]))
        assert tokens_of(alone) == completions[index], index


def test_cached_prompt_tokens_count_a_repeated_images_tokens(stack):
    image = image_bytes(noise_image(64, 48, seed=83))   # 4x3 patches: 15 image tokens
    first = chat(stack.gateway, chat_request([("user", [image, "What is it?"])], max_tokens=2, temperature=0.0))
    again = chat(stack.gateway, chat_request([("user", [image, "And the colour?"])], max_tokens=2, temperature=0.0))
    assert first[-1].usage.cached_prompt_tokens == 0
    assert again[-1].usage.cached_prompt_tokens >= 16   # BOS, [INST] and the image: one full block at least
    assert again[-1].usage.cached_prompt_tokens % 16 == 0


def test_bad_generation_controls_are_named(stack):
    cases = [
        (dict(repetition_penalty=0.0), "sampling.repetition_penalty"),
        (dict(presence_penalty=2.5), "sampling.presence_penalty"),
        (dict(frequency_penalty=float("nan")), "sampling.frequency_penalty"),
        (dict(min_p=1.5), "sampling.min_p"),
        (dict(logit_bias={200000: 1.0}), "sampling.logit_bias"),
        (dict(logit_bias={5: 101.0}), "sampling.logit_bias[5]"),
        (dict(max_tokens=4, min_tokens=5), "sampling.min_tokens"),
        (dict(stop_token_ids=[131072]), "sampling.stop_token_ids"),
        (dict(top_logprobs=21), "sampling.top_logprobs"),
    ]
    for sampling, field in cases:
        with grpc.insecure_channel(stack.gateway) as channel, pytest.raises(grpc.RpcError) as caught:
            list(gateway_pb2_grpc.GatewayStub(channel).Chat(chat_request(TURN, **sampling), timeout=30))
        assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, f"{field}:")
    request = chat_request(TURN)
    request.n = 100
    with grpc.insecure_channel(stack.gateway) as channel, pytest.raises(grpc.RpcError) as caught:
        list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=30))
    assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "n: must be in [1, 16], got 100")
