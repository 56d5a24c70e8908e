"""Reference results: mistral-common's tokenization and transformers' LlavaForConditionalGeneration.generate."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import torch
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from PIL import Image

from pixtral.v1 import common_pb2, gateway_pb2
from shared.tokenizer import load_tokenizer

# A chat for tests: [(role, [str | bytes, ...]), ...]; bytes are image files.
ROLES = {"system": gateway_pb2.ROLE_SYSTEM, "user": gateway_pb2.ROLE_USER, "assistant": gateway_pb2.ROLE_ASSISTANT}


def chat_request(chat, **sampling) -> gateway_pb2.ChatRequest:
    messages = []
    for role, parts in chat:
        content = [gateway_pb2.ContentPart(text=part) if isinstance(part, str)
                   else gateway_pb2.ContentPart(image=gateway_pb2.ImagePart(data=part)) for part in parts]
        messages.append(gateway_pb2.Message(role=ROLES[role], content=content))
    return gateway_pb2.ChatRequest(messages=messages, sampling=common_pb2.SamplingParams(**sampling))


def encode_reference(chat):
    """mistral-common's encode_chat_completion on the same chat (images opened from the same bytes)."""
    messages = []
    for role, parts in chat:
        if role == "user":
            messages.append(UserMessage(content=[
                TextChunk(text=part) if isinstance(part, str) else ImageChunk(image=Image.open(io.BytesIO(part)))
                for part in parts]))
        elif role == "system":
            messages.append(SystemMessage(content="".join(parts)))
        else:
            messages.append(AssistantMessage(content="".join(parts)))
    return load_tokenizer().encode_chat_completion(ChatCompletionRequest(messages=messages))


@functools.cache
def llava(model_dir: Path):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.inference_mode()
def reference_generate(model_dir: Path, chat, max_new_tokens: int) -> tuple[list[int], list[int], torch.Tensor]:
    """(prompt ids, greedy completion ids, per-step logits [n, vocab]) of transformers' generate."""
    encoded = encode_reference(chat)
    kwargs = {}
    if encoded.images:
        height = max(image.shape[1] for image in encoded.images)
        width = max(image.shape[2] for image in encoded.images)
        pixels = torch.zeros(len(encoded.images), 3, height, width)
        for index, image in enumerate(encoded.images):
            pixels[index, :, :image.shape[1], :image.shape[2]] = torch.from_numpy(image)
        kwargs = {"pixel_values": pixels,
                  "image_sizes": torch.tensor([[image.shape[1], image.shape[2]] for image in encoded.images])}
    out = llava(model_dir).generate(input_ids=torch.tensor([encoded.tokens]), max_new_tokens=max_new_tokens,
                                    do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)
    completion = out.sequences[0, len(encoded.tokens):].tolist()
    return list(encoded.tokens), completion, torch.stack([logits[0] for logits in out.logits])


def assert_greedy_equal(ours: list[int], reference: list[int], logits: torch.Tensor) -> None:
    """Equal, or diverging only where the reference's top-2 logits tie within 1e-4 (the numerics contract)."""
    for step, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            top2 = logits[step].topk(2).values
            assert float(top2[0] - top2[1]) < 1e-4, (
                f"diverged at step {step}: ours {a}, reference {b}, top-2 gap {float(top2[0] - top2[1]):.2e}")
            return
    assert len(ours) == len(reference), f"{len(ours)} tokens, reference {len(reference)}"
