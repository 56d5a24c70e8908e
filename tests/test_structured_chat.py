"""Structured output and tools through the running stack (float32, tiny checkpoint, the real Tekken vocabulary):
every response format's output parses and validates for many seeds, bad formats are refused naming the field,
tool prompts are token-exact with mistral-common, and required or named tool choices give parsed tool calls."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

from pixtral.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from shared.tokenizer import load_tokenizer
from tests.reference import chat_request
from tests.support import assert_status

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8}, "rain": {"type": "boolean"},
    "level": {"type": "integer", "minimum": 0, "maximum": 9}, "sky": {"enum": ["clear", "cloudy"]}},
    "required": ["city", "rain", "level", "sky"], "additionalProperties": False}
GRAMMAR = 'root ::= greeting " " name "!"\ngreeting ::= "hello" | "hi" | "dear " title\ntitle ::= "Dr" | "Ms"\n' \
          'name ::= [A-Z] [a-z] [a-z]?'
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}},
                          "required": ["city"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "The time in a zone",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}
# Biases toward the tokens that close a JSON value (" and } and ]): random weights would wander in strings.
CLOSING = {1034: 10.0, 1125: 10.0, 46005: 10.0, 1093: 10.0, 27028: 10.0}


def stream(gateway: str, request) -> list[gateway_pb2.ChatResponse]:
    with grpc.insecure_channel(gateway) as channel:
        return list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=120))


def with_format(request, **fmt) -> gateway_pb2.ChatRequest:
    for kind, spec in fmt.items():
        if kind == "choice":
            request.response_format.choice.choices.extend(spec)
        elif kind == "json_object":
            request.response_format.json_object = True
        else:
            setattr(request.response_format, kind, spec)
    return request


def text_and_check(responses) -> str:
    """The completion's text; every streamed piece is valid text, and the text is what its tokens decode to."""
    text = "".join(r.text for r in responses)
    tokens = [t for r in responses for t in r.token_ids]
    assert load_tokenizer().decode(tokens) == text
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_STOP, responses[-1]
    return text


@pytest.mark.parametrize("seed", range(6))
def test_every_format_gives_output_that_parses_and_validates(stack, seed):
    turn = [("user", ["Answer."])]
    sampling = dict(max_tokens=200, temperature=1.0, seed=seed)
    cases = [
        (dict(json_schema=json.dumps(SCHEMA)), lambda text: jsonschema.validate(json.loads(text), SCHEMA)),
        (dict(json_object=True), lambda text: isinstance(json.loads(text), dict) or pytest.fail(text)),
        (dict(regex=r"[a-z]{2,6}@(example|test)\.(com|org)"),
         lambda text: re.fullmatch(r"[a-z]{2,6}@(example|test)\.(com|org)", text) or pytest.fail(text)),
        (dict(choice=["yes", "no", "maybe not"]), lambda text: text in ("yes", "no", "maybe not") or pytest.fail(text)),
        (dict(grammar=GRAMMAR),
         lambda text: re.fullmatch(r"(hello|hi|dear (Dr|Ms)) [A-Z][a-z][a-z]?!", text) or pytest.fail(text)),
    ]
    for fmt, check in cases:
        bias = CLOSING if "json_object" in fmt else {}
        check(text_and_check(stream(stack.gateway, with_format(chat_request(turn, **sampling, logit_bias=bias),
                                                               **fmt))))


def test_a_format_the_library_cannot_compile_is_refused_naming_response_format(stack):
    cases = [dict(json_schema="{not json"), dict(json_schema=json.dumps({"type": "strange"})),
             dict(regex="(unclosed"), dict(grammar="root ::= missing_rule"), dict(choice=[])]
    for fmt in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stream(stack.gateway, with_format(chat_request([("user", ["Hi"])]), **fmt))
        assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "response_format:")


def tool(spec: dict) -> gateway_pb2.Tool:
    return gateway_pb2.Tool(name=spec["name"], description=spec["description"],
                            parameters=json.dumps(spec["parameters"]))


def tokenize(gateway: str, request) -> list[int]:
    with grpc.insecure_channel(gateway) as channel:
        return list(gateway_pb2_grpc.GatewayStub(channel).Tokenize(request, timeout=30).token_ids)


def mistral_tool(spec: dict) -> Tool:
    return Tool(function=Function(**spec))


def test_tools_system_tool_turns_and_multi_turn_prompts_are_token_exact(stack):
    message = gateway_pb2.Message
    text = gateway_pb2.ContentPart
    call = gateway_pb2.ToolCall(id="abcDEF123", name="get_weather", arguments='{"city": "Paris"}')
    request = gateway_pb2.ChatRequest(tools=[tool(WEATHER), tool(TIME)], messages=[
        message(role=gateway_pb2.ROLE_SYSTEM, content=[text(text="Be brief.")]),
        message(role=gateway_pb2.ROLE_USER, content=[text(text="Weather in Paris?")]),
        message(role=gateway_pb2.ROLE_ASSISTANT, tool_calls=[call]),
        message(role=gateway_pb2.ROLE_TOOL, tool_call_id="abcDEF123", content=[text(text='{"sky": "clear"}')]),
        message(role=gateway_pb2.ROLE_ASSISTANT, content=[text(text="Clear.")]),
        message(role=gateway_pb2.ROLE_USER, content=[text(text="And the time in UTC?")])])
    expected = load_tokenizer().encode_chat_completion(ChatCompletionRequest(
        tools=[mistral_tool(WEATHER), mistral_tool(TIME)], messages=[
            SystemMessage(content="Be brief."), UserMessage(content="Weather in Paris?"),
            AssistantMessage(tool_calls=[ToolCall(id="abcDEF123", function=FunctionCall(
                name="get_weather", arguments='{"city": "Paris"}'))]),
            ToolMessage(tool_call_id="abcDEF123", content='{"sky": "clear"}'),
            AssistantMessage(content="Clear."), UserMessage(content="And the time in UTC?")])).tokens
    assert tokenize(stack.gateway, request) == expected
    assert 5 in expected and 9 in expected and 7 in expected   # [AVAILABLE_TOOLS], [TOOL_CALLS], [TOOL_RESULTS]
    prefix = gateway_pb2.ChatRequest(messages=[
        message(role=gateway_pb2.ROLE_USER, content=[text(text="Say hello")]),
        message(role=gateway_pb2.ROLE_ASSISTANT, prefix=True, content=[text(text="Hello, I am")])])
    expected = load_tokenizer().encode_chat_completion(ChatCompletionRequest(messages=[
        UserMessage(content="Say hello"), AssistantMessage(content="Hello, I am", prefix=True)])).tokens
    assert tokenize(stack.gateway, prefix) == expected
    responses = stream(stack.gateway, gateway_pb2.ChatRequest(
        messages=prefix.messages, sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0.0)))
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


@pytest.mark.parametrize("seed", range(4))
def test_a_required_or_named_tool_choice_gives_tool_calls(stack, seed):
    for choice, names in ((gateway_pb2.ToolChoice(mode=gateway_pb2.TOOL_CHOICE_MODE_REQUIRED), {"get_weather",
                                                                                                "get_time"}),
                          (gateway_pb2.ToolChoice(function="get_time"), {"get_time"})):
        request = chat_request([("user", ["What now?"])], max_tokens=120, temperature=1.0, seed=seed,
                               logit_bias=CLOSING)
        request.tools.extend([tool(WEATHER), tool(TIME)])
        request.tool_choice.CopyFrom(choice)
        request.parallel_tool_calls = False
        responses = stream(stack.gateway, request)
        assert responses[-1].finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS, responses[-1]
        calls = [call for r in responses for call in r.tool_calls]
        assert len(calls) == 1 and calls[0].name in names
        assert re.fullmatch(r"[a-zA-Z0-9]{9}", calls[0].id)
        arguments = json.loads(calls[0].arguments)
        jsonschema.validate(arguments, (WEATHER if calls[0].name == "get_weather" else TIME)["parameters"])
        assert "".join(r.text for r in responses) == ""   # the calls are not content


def test_bad_tools_are_refused_naming_the_field(stack):
    cases = [
        ([gateway_pb2.Tool(name="bad name!", parameters="{}")], None, "tools[0].name:"),
        ([gateway_pb2.Tool(name="ok", parameters="[1, 2]")], None, "tools[0].parameters:"),
        ([gateway_pb2.Tool(name="ok", parameters="{nope")], None, "tools[0].parameters:"),
        ([tool(WEATHER)], gateway_pb2.ToolChoice(function="get_time"), "tool_choice.function:"),
        ([], gateway_pb2.ToolChoice(mode=gateway_pb2.TOOL_CHOICE_MODE_REQUIRED), "tool_choice:"),
    ]
    for tools, choice, field in cases:
        request = chat_request([("user", ["Hi"])])
        request.tools.extend(tools)
        if choice is not None:
            request.tool_choice.CopyFrom(choice)
        with pytest.raises(grpc.RpcError) as caught:
            stream(stack.gateway, request)
        assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, field)
