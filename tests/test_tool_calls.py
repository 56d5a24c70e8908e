"""Tools with Pixtral's tokenizer (v3): prompts equal mistral-common's encoding of the same request built by
hand, the model's [TOOL_CALLS] output is parsed however it is streamed or cut, and the tool-call grammar only
produces calls of the tools it names."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolChoiceEnum
from mistral_common.protocol.instruct.tool_calls import ToolCall as MistralToolCall
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from PIL import Image

from shared.chat_messages import ChatTurn, chat_request
from shared.structured_output import EOS_ID, TOOL_CALLS_ID, FormatCompiler, FormatError, ResponseFormat
from shared.tokenizer import load_tokenizer
from shared.tool_call_parser import ToolCallParser
from shared.tool_calls import PLAIN_TEXT, ChatFormatError, ToolCall, prompt_tool_call_id, setup_tools
from tests.test_structured_output import decode, make_closing_bias, sample

AVAILABLE_TOOLS, END_AVAILABLE_TOOLS, TOOL_RESULTS, END_TOOL_RESULTS, INST = 5, 6, 7, 8, 3
ID = re.compile(r"^[a-zA-Z0-9]{9}$")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now"}}
# As pydantic writes a model with a nested one: a reference into the schema's own $defs.
BOOK = {"type": "function", "function": {
    "name": "book_trip", "description": "Books a trip",
    "parameters": {"$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"},
                                                                        "days": {"type": "integer", "minimum": 1,
                                                                                 "maximum": 30}},
                                       "required": ["city", "days"], "additionalProperties": False}},
                   "type": "object", "properties": {"stops": {"type": "array", "items": {"$ref": "#/$defs/Place"},
                                                              "minItems": 1, "maxItems": 3}},
                   "required": ["stops"], "additionalProperties": False}}}
TOOLS = [WEATHER, NOW, BOOK]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def mistral_tools(tools=TOOLS):
    return [Tool(function=Function(name=tool["function"]["name"], description=tool["function"].get("description", ""),
                                   parameters=tool["function"].get("parameters", {}))) for tool in tools]


def encode(tokenizer, request) -> list[int]:
    return tokenizer.encode_chat_completion(request).tokens


def text_of(tokenizer, tokens) -> str:
    return tokenizer.decode(tokens, special_token_policy=SpecialTokenPolicy.KEEP)


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)


def test_tools_are_listed_before_the_last_user_message(tokenizer):
    turns = [ChatTurn("system", ("Be brief.",)), ChatTurn("system", ("Answer in French.",)),
             ChatTurn("user", ("Hi",)), ChatTurn("assistant", ("Hello!",)), ChatTurn("user", ("Weather in Paris?",))]
    tokens = encode(tokenizer, chat_request(turns, setup_tools(TOOLS)))
    by_hand = ChatCompletionRequest(messages=[
        SystemMessage(content="Be brief."), SystemMessage(content="Answer in French."), UserMessage(content="Hi"),
        AssistantMessage(content="Hello!"), UserMessage(content="Weather in Paris?")], tools=mistral_tools())
    assert tokens == encode(tokenizer, by_hand)
    assert tokens.count(AVAILABLE_TOOLS) == 1 and tokens.count(INST) == 2
    tools_end = tokens.index(END_AVAILABLE_TOOLS)
    assert tokens[tools_end + 1] == INST and tokens.index(INST, 2) == tools_end + 1
    listed = json.loads(tokenizer.decode(tokens[tokens.index(AVAILABLE_TOOLS) + 1:tools_end]))
    assert [tool["function"]["name"] for tool in listed] == ["get_weather", "now", "book_trip"]
    assert text_of(tokenizer, tokens).endswith("[INST]Be brief.\n\nAnswer in French.\n\nWeather in Paris?[/INST]")


@pytest.mark.parametrize("choice", ["auto", "none", "required", {"type": "function", "function": {"name": "now"}}])
def test_tool_choice_leaves_the_prompt_as_mistral_common_writes_it(tokenizer, choice):
    turns = [ChatTurn("user", ("What time is it?",))]
    tokens = encode(tokenizer, chat_request(turns, setup_tools(TOOLS, choice)))
    for hand_choice in ToolChoiceEnum.auto, ToolChoiceEnum.none:
        by_hand = ChatCompletionRequest(messages=[UserMessage(content="What time is it?")], tools=mistral_tools(),
                                        tool_choice=hand_choice)
        assert tokens == encode(tokenizer, by_hand)
    assert tokens[:2] == [1, AVAILABLE_TOOLS]


def test_tool_choice_decides_what_the_output_may_be():
    assert setup_tools(TOOLS).response_format is None and setup_tools(TOOLS).parses_tool_calls
    none = setup_tools(TOOLS, "none")
    assert none.response_format == PLAIN_TEXT and not none.parses_tool_calls
    required = setup_tools(TOOLS, "required").response_format
    assert required.kind == "tool_calls"
    assert {item["properties"]["name"]["const"] for item in json.loads(required.spec)["items"]["anyOf"]} == \
        {"get_weather", "now", "book_trip"}
    named = json.loads(setup_tools(TOOLS, {"type": "function", "function": {"name": "now"}}).response_format.spec)
    assert named["items"]["properties"]["name"] == {"const": "now"}
    assert json.loads(setup_tools(TOOLS, "required", parallel_tool_calls=False).response_format.spec)["maxItems"] == 1
    without_tools = setup_tools(None)
    assert without_tools.tool_choice is ToolChoiceEnum.none
    assert without_tools.response_format is None and not without_tools.parses_tool_calls
    json_answer = ResponseFormat("json_object")
    assert setup_tools(TOOLS).output_format(json_answer) is json_answer
    assert setup_tools(TOOLS, "none").output_format(json_answer) is json_answer
    with pytest.raises(ChatFormatError, match="response_format"):
        setup_tools(TOOLS, "required").output_format(json_answer)


def test_tool_calls_and_results_in_the_history(tokenizer):
    calls = (ToolCall("abcDEF123", "get_weather", {"city": "Paris"}),
             ToolCall("xyz789QRS", "get_weather", {"city": "Zürich", "unit": "celsius"}))
    turns = [ChatTurn("user", ("Weather in Paris and Zürich?",)), ChatTurn("assistant", tool_calls=calls),
             ChatTurn("tool", ('{"temperature": 21}',), tool_call_id="abcDEF123"),
             ChatTurn("tool", ("sunny, 18°",), tool_call_id="xyz789QRS"),
             ChatTurn("assistant", ("Paris 21, Zürich 18.",)), ChatTurn("user", ("And tomorrow?",))]
    tokens = encode(tokenizer, chat_request(turns, setup_tools(TOOLS)))
    by_hand = ChatCompletionRequest(messages=[
        UserMessage(content="Weather in Paris and Zürich?"),
        AssistantMessage(tool_calls=[
            MistralToolCall(id="abcDEF123", function=FunctionCall(name="get_weather", arguments={"city": "Paris"})),
            MistralToolCall(id="xyz789QRS", function=FunctionCall(name="get_weather",
                                                                  arguments={"city": "Zürich", "unit": "celsius"}))]),
        ToolMessage(content='{"temperature": 21}', tool_call_id="abcDEF123"),
        ToolMessage(content="sunny, 18°", tool_call_id="xyz789QRS"),
        AssistantMessage(content="Paris 21, Zürich 18."), UserMessage(content="And tomorrow?")], tools=mistral_tools())
    assert tokens == encode(tokenizer, by_hand)
    text = text_of(tokenizer, tokens)
    assert ('[/INST][TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}, '
            '{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}, "id": "xyz789QRS"}]</s>'
            '[TOOL_RESULTS]{"content": {"temperature": 21}, "call_id": "abcDEF123"}[/TOOL_RESULTS]'
            '[TOOL_RESULTS]{"content": "sunny, 18°", "call_id": "xyz789QRS"}[/TOOL_RESULTS]'
            'Paris 21, Zürich 18.</s>[AVAILABLE_TOOLS]') in text
    assert tokens.count(TOOL_RESULTS) == 2 and tokens.count(END_TOOL_RESULTS) == 2


def test_a_conversation_may_end_with_tool_results(tokenizer):
    turns = [ChatTurn("user", ("Time?",)), ChatTurn("assistant", tool_calls=(ToolCall("a1b2c3d4e", "now", {}),)),
             ChatTurn("tool", ("12:00",), tool_call_id="a1b2c3d4e")]
    tokens = encode(tokenizer, chat_request(turns, setup_tools(TOOLS)))
    by_hand = ChatCompletionRequest(messages=[
        UserMessage(content="Time?"),
        AssistantMessage(tool_calls=[MistralToolCall(id="a1b2c3d4e", function=FunctionCall(name="now", arguments={}))]),
        ToolMessage(content="12:00", tool_call_id="a1b2c3d4e")], tools=mistral_tools())
    assert tokens == encode(tokenizer, by_hand)
    assert tokens[-1] == END_TOOL_RESULTS


def test_call_ids_of_other_services_are_mapped_the_same_in_call_and_result(tokenizer):
    turns = [ChatTurn("user", ("Time?",)),
             ChatTurn("assistant", tool_calls=(ToolCall("call_Zx81-long-id", "now", {}),)),
             ChatTurn("tool", ("12:00",), tool_call_id="call_Zx81-long-id")]
    tokens = encode(tokenizer, chat_request(turns, setup_tools(TOOLS)))
    mapped = prompt_tool_call_id("call_Zx81-long-id")
    assert ID.match(mapped) and mapped != prompt_tool_call_id("call_Zx81-long-iD")
    assert prompt_tool_call_id("a1b2c3d4e") == "a1b2c3d4e"
    by_hand = ChatCompletionRequest(messages=[
        UserMessage(content="Time?"),
        AssistantMessage(tool_calls=[MistralToolCall(id=mapped, function=FunctionCall(name="now", arguments={}))]),
        ToolMessage(content="12:00", tool_call_id=mapped)], tools=mistral_tools())
    assert tokens == encode(tokenizer, by_hand)


def test_an_assistant_prefix_is_continued(tokenizer):
    turns = [ChatTurn("system", ("Be brief.",)), ChatTurn("user", ("Weather?",)),
             ChatTurn("assistant", ("It is ",), is_prefix=True)]
    encoded = tokenizer.encode_chat_completion(chat_request(turns, setup_tools(TOOLS)))
    by_hand = ChatCompletionRequest(messages=[SystemMessage(content="Be brief."), UserMessage(content="Weather?"),
                                              AssistantMessage(content="It is ", prefix=True)], tools=mistral_tools())
    reference = tokenizer.encode_chat_completion(by_hand)
    assert encoded.tokens == reference.tokens and encoded.prefix_ids == reference.prefix_ids
    assert text_of(tokenizer, encoded.tokens).endswith("Weather?[/INST]It is") and encoded.tokens[-1] != EOS_ID


def test_images_are_chunks_the_caller_makes(tokenizer):
    class Picture:  # the caller's own image part: only the callback knows what it is
        def __init__(self, image):
            self.image = image

    red, blue = Image.new("RGB", (40, 24), "red"), Image.new("RGB", (64, 64), "blue")
    turns = [ChatTurn("user", ("Compare", Picture(red), "with", Picture(blue))), ChatTurn("assistant", ("Red.",)),
             ChatTurn("user", ("And this one?", Picture(red)))]
    request = chat_request(turns, setup_tools(TOOLS), image_chunk=lambda part: ImageChunk(image=part.image))
    tokens = encode(tokenizer, request)
    by_hand = ChatCompletionRequest(messages=[
        UserMessage(content=[TextChunk(text="Compare"), ImageChunk(image=red), TextChunk(text="with"),
                             ImageChunk(image=blue)]),
        AssistantMessage(content="Red."),
        UserMessage(content=[TextChunk(text="And this one?"), ImageChunk(image=red)])], tools=mistral_tools())
    assert tokens == encode(tokenizer, by_hand)
    assert tokens.count(10) == 3 * 2 + 4 * 4 + 3 * 2 and tokens.count(13) == 3


def test_text_beside_tool_calls_is_dropped_as_v3_cannot_write_both(tokenizer):
    call = ToolCall("a1b2c3d4e", "now", {})
    turns = [ChatTurn("user", ("Time?",)), ChatTurn("assistant", ("Let me check.",), tool_calls=(call,)),
             ChatTurn("tool", ("12:00",), tool_call_id="a1b2c3d4e")]
    without_text = [turns[0], ChatTurn("assistant", tool_calls=(call,)), turns[2]]
    assert encode(tokenizer, chat_request(turns, setup_tools(TOOLS))) == \
        encode(tokenizer, chat_request(without_text, setup_tools(TOOLS)))


@pytest.mark.parametrize("tools, choice, words", [
    ([{"type": "retrieval"}], None, "tools[0].type"),
    ([{"type": "function", "function": {"name": "bad name"}}], None, "tools[0].function.name"),
    ([WEATHER, {"type": "function", "function": {"name": "get_weather"}}], None, "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}], None,
     "tools[0].function.parameters: not a valid JSON schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "tools[0].function.parameters"),
    (TOOLS, "sometimes", "tool_choice: must be"),
    (TOOLS, {"type": "function", "function": {"name": "missing"}}, "tool_choice.function.name"),
    (TOOLS, {"type": "function"}, "tool_choice: a named choice"),
    (None, "required", "tool_choice: required needs tools"),
    ([NOW] * 129, None, "over the limit"),
])
def test_bad_tools_and_tool_choices_name_the_field(tools, choice, words):
    with pytest.raises(ChatFormatError) as raised:
        setup_tools(tools, choice)
    assert str(raised.value).startswith(words) or words in str(raised.value)


@pytest.mark.parametrize("turns, words", [
    ([ChatTurn("user", ("hi",)), ChatTurn("robot", ("hi",))], "messages[1].role"),
    ([ChatTurn("system", (object(),)), ChatTurn("user", ("hi",))], "messages[0].content[0]"),
    ([ChatTurn("user", ("hi", object()))], "messages[0].content[1]: images are not accepted"),
    ([ChatTurn("user", ("hi",)), ChatTurn("tool", ("x",))], "messages[1].tool_call_id"),
    ([ChatTurn("user", ("hi",)), ChatTurn("assistant", ("a",), is_prefix=True), ChatTurn("user", ("b",))],
     "messages[1].prefix"),
    ([ChatTurn("user", ("hi",)), ChatTurn("assistant", (" ",))], "messages[1].content"),
    ([ChatTurn("user", ("hi",), tool_calls=(ToolCall("a1b2c3d4e", "now", {}),))], "messages[0].tool_calls"),
])
def test_bad_messages_name_the_message(turns, words):
    with pytest.raises(ChatFormatError, match=re.escape(words)):
        chat_request(turns)


CALLS = [ToolCall("", "get_weather", {"city": "Zürich", "unit": "celsius"}),
         ToolCall("", "book_trip", {"stops": [{"city": "Rome \"Eternal\" {city}", "days": 3}]})]


def model_output(tokenizer, content: str = "", calls=CALLS) -> list[int]:
    """What the model writes: optional text, [TOOL_CALLS], the calls as v3 writes them, EOS."""
    listed = json.dumps([{"name": call.name, "arguments": call.arguments} for call in calls], ensure_ascii=False)
    return token_ids(tokenizer, content) + [TOOL_CALLS_ID] + token_ids(tokenizer, listed) + [EOS_ID]


def parse(tokenizer, chunks) -> tuple[str, list[ToolCall], str]:
    parser = ToolCallParser(tokenizer)
    content, calls = "", []
    for chunk in chunks:
        delta = parser.feed(chunk)
        content += delta.content
        calls += delta.tool_calls
    last = parser.finish()
    return content + last.content, calls + list(last.tool_calls), last.unparsed


def same_calls(calls, expected) -> bool:
    return [(call.name, call.arguments) for call in calls] == [(call.name, call.arguments) for call in expected]


def test_the_parser_reads_content_then_calls_with_generated_ids(tokenizer):
    content, calls, unparsed = parse(tokenizer, [model_output(tokenizer, "Checking 🙂 ")])
    assert content == "Checking 🙂 " and same_calls(calls, CALLS) and unparsed == ""
    assert all(ID.match(call.id) for call in calls) and calls[0].id != calls[1].id
    assert parse(tokenizer, [token_ids(tokenizer, "Just text, [not calls].") + [EOS_ID]]) == \
        ("Just text, [not calls].", [], "")


def test_each_call_comes_out_once_its_object_is_complete(tokenizer):
    parser = ToolCallParser(tokenizer)
    output = model_output(tokenizer)
    seen = []
    for index, token_id in enumerate(output):
        delta = parser.feed([token_id])
        seen += [(index, call.name) for call in delta.tool_calls]
    text_before = tokenizer.decode(output[:seen[0][0] + 1])
    assert [name for _, name in seen] == ["get_weather", "book_trip"]
    assert '"celsius"}}' in text_before and "book_trip" not in text_before


def test_the_parser_gives_the_same_answer_however_the_output_is_split(tokenizer):
    raw = tokenizer.instruct_tokenizer.tokenizer
    byte_tokens = {raw.id_to_byte_piece(token_id, SpecialTokenPolicy.IGNORE): token_id
                   for token_id in range(1000, 1256)}
    output = model_output(tokenizer, "Héllo ")
    # The same output written one byte a token: characters and JSON split anywhere.
    bytewise = []
    for token_id in output:
        piece = raw.id_to_byte_piece(token_id, SpecialTokenPolicy.IGNORE)
        bytewise += [byte_tokens[bytes([byte])] for byte in piece] if piece else [token_id]
    rng = random.Random(0)
    for ids in (output, bytewise):
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(ids)), rng.randint(1, 12)))
            chunks = [ids[start:end] for start, end in zip([0, *cuts], [*cuts, len(ids)])]
            content, calls, unparsed = parse(tokenizer, chunks)
            assert content == "Héllo " and same_calls(calls, CALLS) and unparsed == ""


def test_output_cut_anywhere_gives_the_calls_completed_and_the_rest_unparsed(tokenizer):
    output = model_output(tokenizer, "Ok. ")[:-1]  # cut by max_tokens: no EOS
    start = output.index(TOOL_CALLS_ID)
    listed = tokenizer.decode(output[start + 1:])
    spans = []  # where each call's object is in the list's text
    for call in CALLS:
        written = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
        spans.append((listed.index(written), listed.index(written) + len(written)))
    for end in range(len(output) + 1):
        content, calls, unparsed = parse(tokenizer, [output[:end]])
        assert content == tokenizer.decode(output[:min(end, start)])
        written = tokenizer.decode(output[start + 1:end]) if end > start else ""
        num_complete = sum(1 for _, span_end in spans if span_end <= len(written))
        assert same_calls(calls, CALLS[:num_complete])
        inside = [span_start for span_start, span_end in spans if span_start < len(written) < span_end]
        assert unparsed == (written[inside[0]:].strip() if inside else "")


@pytest.mark.parametrize("written, names, unparsed", [
    ('not json at all', [], "not json at all"),
    ('{"name": "now", "arguments": {}}', ["now"], ""),                      # one bare object
    ('[{"name": "now", "arguments": "{\\"x\\": 1}"}]', ["now"], ""),         # arguments as a JSON string
    ('[{"name": "now"}]', ["now"], ""),                                       # no arguments: {}
    ('[{"name": "now", "arguments": {}}, {"nom": "x"}, {"name": "now"}]', ["now"], '{"nom": "x"}, {"name": "now"}]'),
    ('[{"name": "now", "arguments": [1]}]', [], '{"name": "now", "arguments": [1]}]'),
    ('[{"name": "now", "arguments": {}} {"name": "now"}]', ["now"], '{"name": "now"}]'),
    ('[{"name": "now", "arguments": {}}] and then text', ["now"], "and then text"),
    ('[{"name": "now", "arguments": {"a": tru}}]', [], '{"name": "now", "arguments": {"a": tru}}]'),
    ('[]', [], ""),
])
def test_malformed_calls_never_raise(tokenizer, written, names, unparsed):
    content, calls, left = parse(tokenizer, [[TOOL_CALLS_ID] + token_ids(tokenizer, written) + [EOS_ID]])
    assert content == "" and [call.name for call in calls] == names and left == unparsed
    if names:
        assert calls[0].arguments in ({}, {"x": 1})


def test_a_second_list_of_calls_is_read_too(tokenizer):
    first = model_output(tokenizer, "", CALLS[:1])[:-1]
    second = model_output(tokenizer, " ", CALLS[1:])
    content, calls, unparsed = parse(tokenizer, [first + second])
    assert content == "" and same_calls(calls, CALLS) and unparsed == ""


def test_parsed_calls_go_back_into_the_history_as_they_are(tokenizer):
    _, calls, _ = parse(tokenizer, [model_output(tokenizer)])
    turns = [ChatTurn("user", ("Plan it",)), ChatTurn("assistant", tool_calls=tuple(calls))] + \
        [ChatTurn("tool", ("done",), tool_call_id=call.id) for call in calls]
    text = text_of(tokenizer, encode(tokenizer, chat_request(turns, setup_tools(TOOLS))))
    assert all(f'"id": "{call.id}"' in text and f'"call_id": "{call.id}"' in text for call in calls)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return FormatCompiler(tokenizer)


@pytest.mark.parametrize("choice, parallel, names", [
    ("required", True, {"get_weather", "now", "book_trip"}),
    ("required", False, {"get_weather", "now", "book_trip"}),
    ({"type": "function", "function": {"name": "book_trip"}}, True, {"book_trip"}),
])
def test_tool_call_grammar_walks_parse_into_calls_of_the_tools(tokenizer, compiler, choice, parallel, names):
    setup = setup_tools(TOOLS, choice, parallel_tool_calls=parallel)
    compiled = compiler.compile(setup.response_format)
    schemas = {tool["function"]["name"]: tool["function"].get("parameters") or {"type": "object"} for tool in TOOLS}
    bias = make_closing_bias(tokenizer)
    seen = set()
    for seed in range(10):
        ids = sample(compiled, seed, bias)
        decode(tokenizer, ids)
        assert ids[0] == TOOL_CALLS_ID
        content, calls, unparsed = parse(tokenizer, [ids + [EOS_ID]])
        assert content == "" and unparsed == "" and calls
        assert parallel or len(calls) == 1
        for call in calls:
            assert call.name in names and ID.match(call.id)
            jsonschema.validate(call.arguments, schemas[call.name])
            seen.add(call.name)
    assert seen == names or len(seen) > 1


def test_tool_choice_none_walks_are_plain_text_without_control_tokens(tokenizer, compiler):
    compiled = compiler.compile(setup_tools(TOOLS, "none").response_format)
    bias = make_closing_bias(tokenizer)
    bias[EOS_ID] = 11.0  # free text has nothing to close: walks end by EOS alone
    lengths = []
    for seed in range(4):
        ids = sample(compiled, seed, bias)  # checks that no step offers a control token
        assert parse(tokenizer, [ids + [EOS_ID]]) == (decode(tokenizer, ids), [], "")
        lengths.append(len(ids))
    assert max(lengths) > 1
    matcher = compiled.matcher()
    assert all(matcher.accept(token_id) for token_id in token_ids(tokenizer, "Text that says [TOOL_CALLS]"))
    assert not matcher.accept(TOOL_CALLS_ID) and matcher.accept(EOS_ID)


def test_a_tool_whose_schema_does_not_compile_is_refused(compiler):
    setup = setup_tools([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}}}}}], "required")
    with pytest.raises(FormatError, match="tool_calls: .*Lookbehind"):
        compiler.compile(setup.response_format)


def test_tools_too_large_for_a_grammar_are_refused_naming_tools():
    huge = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {f"field_{index}": {"type": "string", "description": "x" * 100}
                                         for index in range(1000)}}}}
    assert setup_tools([huge]).response_format is None, "auto needs no grammar"
    with pytest.raises(ChatFormatError, match="^tools: tool_calls: .* over the limit"):
        setup_tools([huge], "required")
