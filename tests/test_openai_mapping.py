"""The HTTP API's logic alone (no processes): every JSON field reaches the domain's ChatInput where the gRPC transport
puts it, a domain error's field maps back to the JSON path the caller used, and ChatDeltas render as OpenAI's
objects, which the official SDK's own types parse (n, logprobs, tool calls, stop reasons, usage)."""

from __future__ import annotations

import json

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from services.gateway.chat import ChatDelta, Usage
from services.gateway.completion import TokenLogprob, ToolCallOutput, TopLogprob
from services.gateway.http.convert import Params, chat_from_json
from services.gateway.http.errors import from_service_error, json_path
from services.gateway.http.render import Rendering, TokenPieces
from services.gateway.http.schema import ChatCompletionRequest, unsupported_fields
from services.gateway.request import (ChatMessage, FormatInput, ImageSource, Role, SamplingInput, TextPart,
                                      ToolCallInput, ToolInput)
from shared.errors import ImageNotCached, InvalidRequest
from shared.tokenizer import load_tokenizer

SHA = "ab" * 32


def convert(**body):
    return chat_from_json(ChatCompletionRequest.model_validate(body), "rid")


def test_every_field_reaches_the_domain():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    chat, params = convert(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Where?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                         {"type": "image_url", "image_url": f"sha256:{SHA}"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "abcDEF123", "type": "function", "function": {"name": "locate", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "abcDEF123", "content": "Paris"},
            {"role": "user", "content": "And now?"},
            {"role": "assistant", "content": "It is", "prefix": True}],
        max_tokens=7, max_completion_tokens=9, n=3, stop="END", seed=5, temperature=0.5, top_p=0.9,
        logprobs=True, top_logprobs=2, presence_penalty=0.1, frequency_penalty=0.2, logit_bias={"42": -5, "7": 1.5},
        response_format={"type": "json_schema", "json_schema": {"name": "where", "schema": schema, "strict": True}},
        tools=[{"type": "function", "function": {"name": "locate", "description": "Finds it",
                                                 "parameters": schema}}],
        tool_choice={"type": "function", "function": {"name": "locate"}}, parallel_tool_calls=False,
        top_k=40, min_p=0.05, repetition_penalty=1.1, min_tokens=2, stop_token_ids=[2, 9], ignore_eos=True,
        user="ignored")
    assert chat.request_id == "rid"
    assert chat.messages == [
        ChatMessage(Role.SYSTEM, [TextPart("Be brief.")], "messages[0]"),
        ChatMessage(Role.USER, [TextPart("Where?"),
                                ImageSource("messages[1].content[1].image_url", url="data:image/png;base64,AAAA"),
                                ImageSource("messages[1].content[2].image_url", sha256=SHA)], "messages[1]"),
        ChatMessage(Role.ASSISTANT, [], "messages[2]",
                    tool_calls=(ToolCallInput("abcDEF123", "locate", "{}", "messages[2].tool_calls[0]"),)),
        ChatMessage(Role.TOOL, [TextPart("Paris")], "messages[3]", tool_call_id="abcDEF123"),
        ChatMessage(Role.USER, [TextPart("And now?")], "messages[4]"),
        ChatMessage(Role.ASSISTANT, [TextPart("It is")], "messages[5]", prefix=True)]
    assert chat.sampling == SamplingInput(
        max_tokens=9, temperature=0.5, top_p=0.9, top_k=40, seed=5, stop=("END",), repetition_penalty=1.1,
        presence_penalty=0.1, frequency_penalty=0.2, min_p=0.05, logit_bias=((42, -5.0), (7, 1.5)), min_tokens=2,
        stop_token_ids=(2, 9), ignore_eos=True, logprobs=True, top_logprobs=2)
    assert (chat.n, chat.response_format) == (3, FormatInput("json_schema", json.dumps(schema)))
    assert chat.tools == (ToolInput("locate", "Finds it", json.dumps(schema), "tools[0]"),)
    assert (chat.tool_choice, chat.tool_choice_is_function, chat.parallel_tool_calls) == ("locate", True, False)
    assert params == Params(max_tokens="max_completion_tokens", is_stop_string=True,
                            format_field="response_format.json_schema.schema",
                            tool_choice_field="tool_choice.function.name")


def test_unset_fields_stay_unset_and_vllm_top_k_off_is_unset():
    chat, params = convert(messages=[{"role": "user", "content": "Hi"}], top_k=-1, max_tokens=3)
    assert chat.sampling == SamplingInput(max_tokens=3)
    assert (chat.n, chat.response_format, chat.tools, chat.tool_choice, chat.parallel_tool_calls) == (
        None, None, (), None, None)
    assert params.max_tokens == "max_tokens"


@pytest.mark.parametrize("fields, expected, field", [
    ({"response_format": {"type": "text"}}, None, "response_format"),
    ({"response_format": {"type": "json_object"}}, FormatInput("json_object", ""), "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, FormatInput("json_object", ""),
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "a+"}}, FormatInput("regex", "a+"), "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, FormatInput("choice", ("yes", "no")),
     "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": "root ::= \"a\""}}, FormatInput("grammar", "root ::= \"a\""),
     "structured_outputs.grammar"),
    ({"structured_outputs": {"json": {"type": "object"}}}, FormatInput("json_schema", '{"type": "object"}'),
     "structured_outputs.json"),
    ({"structured_outputs": {"json_object": True}}, FormatInput("json_object", ""), "structured_outputs.json_object"),
    ({"guided_json": '{"type": "array"}'}, FormatInput("json_schema", '{"type": "array"}'), "guided_json"),
    ({"guided_regex": "b+"}, FormatInput("regex", "b+"), "guided_regex"),
    ({"guided_choice": ["a"]}, FormatInput("choice", ("a",)), "guided_choice"),
    ({"guided_grammar": "g"}, FormatInput("grammar", "g"), "guided_grammar"),
])
def test_output_formats_and_where_they_came_from(fields, expected, field):
    chat, params = convert(messages=[{"role": "user", "content": "Hi"}], **fields)
    assert (chat.response_format, params.format_field) == (expected, field)


def test_continue_final_message_and_tool_choice_modes():
    chat, params = convert(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}],
                           continue_final_message=True, add_generation_prompt=False, tool_choice="required")
    assert chat.messages[-1].prefix and params.param("messages[1].prefix") == "continue_final_message"
    assert (chat.tool_choice, chat.tool_choice_is_function, params.tool_choice_field) == (
        "required", False, "tool_choice")


@pytest.mark.parametrize("body, field, problem", [
    ({"continue_final_message": True}, "continue_final_message", "the last message must be the assistant's"),
    ({"add_generation_prompt": False}, "add_generation_prompt", "only for continue_final_message"),
    ({"tool_choice": {"type": "function"}}, "tool_choice", "must be"),
    ({"tool_choice": 3}, "tool_choice", "must be"),
    ({"logit_bias": {"-1": 2}}, "logit_bias.-1", "keys must be token ids"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "is required"),
    ({"guided_regex": "a", "structured_outputs": {"choice": ["b"]}}, "guided_regex", "structured_outputs.choice"),
    ({"structured_outputs": {"regex": "a", "grammar": "b"}}, "structured_outputs.grammar", "one output format"),
])
def test_conversion_errors_name_the_json_field(body, field, problem):
    with pytest.raises(InvalidRequest) as caught:
        convert(messages=[{"role": "user", "content": "Hi"}], **body)
    assert caught.value.field == field and problem in caught.value.problem


def test_unsupported_fields_are_found_at_values_that_change_the_output():
    extra = {"audio": {"voice": "x"}, "modalities": ["text"], "echo": False, "best_of": 2, "unknown": 1,
             "skip_special_tokens": True, "include_stop_str_in_output": True, "prompt_logprobs": False}
    assert [name for name, _ in unsupported_fields(extra)] == ["audio", "best_of", "include_stop_str_in_output",
                                                               "prompt_logprobs"]


@pytest.mark.parametrize("field, params, param", [
    ("sampling.temperature", Params(), "temperature"),
    ("sampling.max_tokens", Params(max_tokens="max_tokens"), "max_tokens"),
    ("sampling.max_tokens", Params(), "max_completion_tokens"),
    ("sampling.stop[2]", Params(), "stop[2]"),
    ("sampling.stop[0]", Params(is_stop_string=True), "stop"),
    ("sampling.logit_bias[42]", Params(), "logit_bias.42"),
    ("sampling.stop_token_ids[1]", Params(), "stop_token_ids[1]"),
    ("response_format.json_schema", Params(format_field="structured_outputs.json"), "structured_outputs.json"),
    ("tool_choice.function", Params(tool_choice_field="tool_choice.function.name"), "tool_choice.function.name"),
    ("tools[1].parameters", Params(), "tools[1].function.parameters"),
    ("tools[0].name", Params(), "tools[0].function.name"),
    ("tools", Params(), "tools"),
    ("messages[2].tool_calls[0].arguments", Params(), "messages[2].tool_calls[0].function.arguments"),
    ("messages[2].tool_calls[0].id", Params(), "messages[2].tool_calls[0].id"),
    ("messages[0].content[1].image_url.sha256", Params(), "messages[0].content[1].image_url.url"),
    ("messages[0].content[1].image_url.url", Params(), "messages[0].content[1].image_url.url"),
    ("messages[0].content[1].image_url", Params(), "messages[0].content[1].image_url"),
    ("messages[3].prefix", Params(), "messages[3].prefix"),
    ("n", Params(), "n"),
    ("request", Params(), None),
])
def test_domain_fields_map_to_the_json_path_sent(field, params, param):
    assert params.param(field) == param


def test_service_errors_become_openai_errors():
    error = from_service_error(InvalidRequest("sampling.top_p", "must be in (0, 1]"), Params())
    assert (error.status, error.param, error.code) == (400, "top_p", "invalid_argument")
    assert error.body() == {"error": {"message": "top_p: must be in (0, 1]", "type": "invalid_request_error",
                                      "param": "top_p", "code": "invalid_argument"}}
    missing = from_service_error(ImageNotCached("...", SHA), Params(), {SHA: "messages[0].content[0].image_url"})
    assert (missing.status, missing.param, missing.code) == (400, "messages[0].content[0].image_url.url",
                                                             "image_not_cached")
    assert json_path(["messages", 0, "content", "list[ContentPart]", 1, "image_url", "url"]) == \
        "messages[0].content[1].image_url.url"
    assert json_path(["stop", "list[str]", 0]) == "stop[0]" and json_path([]) is None


# -- rendering ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pieces() -> TokenPieces:
    return TokenPieces(load_tokenizer())


USAGE = Usage(prompt_tokens=10, completion_tokens=5, image_tokens=4, cached_images=1, encoded_images=0,
              cached_prompt_tokens=8)
HELLO, WORLD = 22177, 4304   # "Hello", " world"


def deltas_of_two_completions() -> list[ChatDelta]:
    """n = 2 interleaved: the first says "Hello world" (with logprobs), the second calls a tool."""
    top = (TopLogprob(HELLO, -0.1, "Hello"), TopLogprob(WORLD, -2.5, " world"))
    return [
        ChatDelta("Hello", [HELLO], index=0, logprobs=(TokenLogprob(HELLO, -0.1, top),)),
        ChatDelta("", [9, 1000], index=1, logprobs=(TokenLogprob(9, -0.3), TokenLogprob(1000, float("-inf")))),
        ChatDelta(" world", [WORLD], index=0, logprobs=(TokenLogprob(WORLD, -1.0),)),
        ChatDelta("", [2], index=1, logprobs=(TokenLogprob(2, -0.01),),
                  tool_calls=(ToolCallOutput("abcDEF123", "locate", '{"city": "Paris"}'),)),
        ChatDelta("", [], "tool_calls", index=1, seed=6, stop_reason=2),
        ChatDelta("", [], "stop", index=0, seed=5, stop_reason=2),
        ChatDelta("", [], usage=USAGE),
    ]


def test_a_whole_answer_is_a_chat_completion_of_the_sdk(pieces):
    rendering = Rendering("rid", "tiny", pieces, is_logprobs=True, is_token_ids=True, is_usage_in_chunks=False)
    for delta in deltas_of_two_completions():
        rendering.add(delta)
    assert rendering.failure is None
    completion = ChatCompletion.model_validate(rendering.completion())
    assert (completion.id, completion.object, completion.model) == ("chatcmpl-rid", "chat.completion", "tiny")
    first, second = completion.choices
    assert (first.index, first.message.content, first.finish_reason) == (0, "Hello world", "stop")
    assert [(entry.token, entry.logprob, entry.bytes) for entry in first.logprobs.content] == [
        ("Hello", -0.1, list(b"Hello")), (" world", -1.0, list(b" world"))]
    assert [(top.token, top.logprob) for top in first.logprobs.content[0].top_logprobs] == [
        ("Hello", -0.1), (" world", -2.5)]
    assert (second.message.content, second.finish_reason) == (None, "tool_calls")
    (call,) = second.message.tool_calls
    assert (call.id, call.type, call.function.name, json.loads(call.function.arguments)) == (
        "abcDEF123", "function", "locate", {"city": "Paris"})
    assert second.logprobs.content[1].logprob == -9999.0   # -inf has no JSON
    assert second.model_extra["token_ids"] == [9, 1000, 2] and first.model_extra["stop_reason"] == 2
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 5, 15)
    assert (usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens_details.image_tokens) == (8, 4)
    assert (usage.model_extra["cached_images"], usage.model_extra["encoded_images"]) == (1, 0)


def test_a_stream_is_chat_completion_chunks_of_the_sdk(pieces):
    rendering = Rendering("rid", "tiny", pieces, is_logprobs=True, is_token_ids=False, is_usage_in_chunks=True)
    chunks = [ChatCompletionChunk.model_validate(chunk) for chunk in
              (rendering.chunk(delta) for delta in deltas_of_two_completions()) if chunk is not None]
    chunks.append(ChatCompletionChunk.model_validate(rendering.usage_chunk()))
    by_choice: dict[int, list] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        by_choice[choice.index].append(choice)
        assert chunk.usage is None and chunk.object == "chat.completion.chunk"
    for choices in by_choice.values():
        assert choices[0].delta.role == "assistant" and all(c.delta.role is None for c in choices[1:])
    assert "".join(c.delta.content or "" for c in by_choice[0]) == "Hello world"
    assert [c.finish_reason for c in by_choice[0]] == [None, None, "stop"]
    (call,) = [call for c in by_choice[1] for call in c.delta.tool_calls or ()]
    assert (call.index, call.id, call.type, call.function.name, call.function.arguments) == (
        0, "abcDEF123", "function", "locate", '{"city": "Paris"}')
    assert by_choice[1][-1].finish_reason == "tool_calls"
    assert [entry.token for c in by_choice[0] if c.logprobs for entry in c.logprobs.content] == ["Hello", " world"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 15


def test_a_cancelled_or_failed_completion_is_no_choice(pieces):
    for reason in ("cancelled", "error"):
        rendering = Rendering("rid", "tiny", pieces, is_logprobs=False, is_token_ids=False, is_usage_in_chunks=False)
        assert rendering.chunk(ChatDelta("Hi", [HELLO])) is not None
        assert rendering.chunk(ChatDelta("", [], reason, usage=USAGE)) is None
        assert rendering.failure == reason and rendering.failure_error().status == "UNAVAILABLE"
