"""Response formats over the real Tekken vocabulary: random walks through each format's masks end in valid
output, control tokens are never offered, bad formats are refused with a reason, compiled formats are cached."""

from __future__ import annotations

import ast
import codecs
import json
import re
import threading

import jsonschema
import pytest
import torch
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

from services.gateway.detokenizer import IncrementalDetokenizer
from shared.format_bitmasks import allocate_bitmask, apply_bitmask, fill_bitmasks
from shared.format_checks import MAX_REPEAT
from shared.structured_output import (EOS_ID, MAX_SPEC_CHARS, NUM_CONTROL_TOKENS, TOOL_CALLS_ID,
                                      VOCAB_SIZE, FormatCompiler, FormatError, ResponseFormat)
from shared.tokenizer import load_tokenizer

NUM_SEEDS = 12
MAX_STEPS = 400
# Random logits alone almost never close a string or a bracket among ~100k allowed tokens: the tokens that
# close things (and EOS) get this much more, so that walks end within MAX_STEPS.
CLOSING_BIAS = 8.0


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return FormatCompiler(tokenizer)


@pytest.fixture(scope="module")
def pieces(tokenizer):
    raw = tokenizer.instruct_tokenizer.tokenizer
    return [raw.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP) for token_id in range(VOCAB_SIZE)]


@pytest.fixture(scope="module")
def closing_bias(tokenizer):
    return make_closing_bias(tokenizer)


def make_closing_bias(tokenizer) -> torch.Tensor:
    raw = tokenizer.instruct_tokenizer.tokenizer
    bias = torch.zeros(VOCAB_SIZE)
    pieces = {token_id: raw.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP)
              for token_id in range(NUM_CONTROL_TOKENS, VOCAB_SIZE)}
    closing = [token_id for token_id, piece in pieces.items() if piece and set(piece) <= set(b'"}])')]
    bias[closing + [EOS_ID]] = CLOSING_BIAS
    return bias


def allowed_tokens(bitmask_row: torch.Tensor) -> torch.Tensor:
    """[4096] int32 -> [131072] bool."""
    bits = (bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(-1)[:VOCAB_SIZE].bool()


def sample(compiled, seed: int, bias: torch.Tensor) -> list[int]:
    """Token ids (without the final EOS) of a random walk that samples from the masked random logits until the
    format ends. Checks at every step that the mask offers no control token the format does not ask for and
    that applying it leaves exactly the allowed tokens."""
    generator = torch.Generator().manual_seed(seed)
    matcher = compiled.matcher()
    bitmask = allocate_bitmask(1)
    ids: list[int] = []
    for step in range(MAX_STEPS):
        matcher.fill_bitmask(bitmask, 0)
        allowed = allowed_tokens(bitmask[0])
        offered_control = set(allowed[:NUM_CONTROL_TOKENS].nonzero().flatten().tolist())
        asked = {TOOL_CALLS_ID} if compiled.format.kind == "tool_calls" and step == 0 else set()
        assert offered_control <= asked | {EOS_ID}, offered_control
        if asked:
            assert allowed.nonzero().flatten().tolist() == [TOOL_CALLS_ID]
        logits = torch.randn(1, VOCAB_SIZE, generator=generator) + bias
        apply_bitmask(logits, bitmask, [0])
        assert torch.equal(torch.isfinite(logits[0]), allowed)
        token_id = int(torch.multinomial(torch.softmax(logits[0], dim=0), 1, generator=generator))
        assert matcher.accept(token_id)
        if token_id == EOS_ID:
            assert matcher.is_terminated
            return ids
        ids.append(token_id)
    pytest.fail(f"seed {seed}: no end within {MAX_STEPS} tokens: {ids[:40]}...")


def decode(tokenizer, ids: list[int]) -> str:
    """The text as mistral-common decodes it, checked against the stream a client would get: the bytes are
    valid UTF-8, each streamed prefix is a prefix of the final text, and nothing is left half a character."""
    raw = tokenizer.instruct_tokenizer.tokenizer
    text = tokenizer.decode(ids)
    data = b"".join(raw.id_to_byte_piece(token_id, SpecialTokenPolicy.IGNORE) for token_id in ids)
    assert codecs.decode(data, "utf-8", errors="strict") == text
    detokenizer = IncrementalDetokenizer(tokenizer)
    streamed = ""
    for token_id in ids:
        streamed += detokenizer.add([token_id])
        assert text.startswith(streamed)
    assert detokenizer.flush() == ""
    assert streamed == text
    return text


def walks(compiler, tokenizer, closing_bias, fmt: ResponseFormat) -> list[tuple[list[int], str]]:
    compiled = compiler.compile(fmt)
    results = []
    for seed in range(NUM_SEEDS):
        ids = sample(compiled, seed, closing_bias)
        results.append((ids, decode(tokenizer, ids)))
    return results


def test_the_vocabulary_is_tekken_with_eos_as_the_stop_token(compiler, pieces):
    info = compiler.tokenizer_info
    assert info.vocab_size == VOCAB_SIZE
    assert info.stop_token_ids == [EOS_ID]
    decoded = info.decoded_vocab
    assert decoded[NUM_CONTROL_TOKENS:] == pieces[NUM_CONTROL_TOKENS:]
    assert decoded[TOOL_CALLS_ID] == b"\xff[TOOL_CALLS]"
    assert sum(1 for piece in pieces[NUM_CONTROL_TOKENS:] if not _is_utf8(piece)) > 1000, \
        "the vocabulary has pieces that are not UTF-8 on their own"


def _is_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_json_object_walks_end_in_a_json_object(compiler, tokenizer, closing_bias):
    for ids, text in walks(compiler, tokenizer, closing_bias, ResponseFormat("json_object")):
        assert isinstance(json.loads(text), dict), text


PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"], "additionalProperties": False},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


def test_json_schema_walks_validate_against_the_schema(compiler, tokenizer, closing_bias):
    results = walks(compiler, tokenizer, closing_bias, ResponseFormat("json_schema", json.dumps(PERSON_SCHEMA)))
    for ids, text in results:
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    assert any(len(json.loads(text)) > 3 for _, text in results), "optional properties were generated too"


@pytest.mark.parametrize("pattern", [r"[a-z]{1,8}@[a-z]{2,6}\.(com|org|fr)", r"^\d{3}-\d{4}$", r"(ab|cd)+x?",
                                     r"[à-ÿ一-龥]{2,6}( 🙂)?"])
def test_regex_walks_match_the_whole_pattern(compiler, tokenizer, closing_bias, pattern):
    for ids, text in walks(compiler, tokenizer, closing_bias, ResponseFormat("regex", pattern)):
        assert re.fullmatch(pattern, text), text


def test_characters_split_across_tokens_come_out_whole(compiler, tokenizer, closing_bias, pieces):
    """Non-ASCII output uses byte tokens and pieces that are not UTF-8 alone; every walk still decodes."""
    results = walks(compiler, tokenizer, closing_bias, ResponseFormat("regex", r"[à-ÿ一-龥]{2,6}( 🙂)?"))
    assert any(not _is_utf8(pieces[token_id]) for ids, _ in results for token_id in ids)


CHOICES = ["yes", "no", "no way", "🙂 naïve \"quoted\"\n", "中文"]


def test_choice_walks_end_in_exactly_one_of_the_choices(compiler, tokenizer, closing_bias):
    results = walks(compiler, tokenizer, closing_bias, ResponseFormat("choice", CHOICES))
    assert all(text in CHOICES for _, text in results)
    assert len({text for _, text in results}) > 2


def test_an_empty_choice_allows_eos_at_once(compiler):
    bitmask = allocate_bitmask(2)
    compiler.compile(ResponseFormat("choice", ["", "no"])).matcher().fill_bitmask(bitmask, 0)
    compiler.compile(ResponseFormat("choice", ["no"])).matcher().fill_bitmask(bitmask, 1)
    assert allowed_tokens(bitmask[0])[EOS_ID] and not allowed_tokens(bitmask[1])[EOS_ID]


ARITHMETIC = r"""
root   ::= expr
expr   ::= term (("+" | "-") term)*
term   ::= factor (("*" | "/") factor)*
factor ::= [1-9] [0-9]{0,2} | "(" expr ")"
"""


def test_grammar_walks_are_sentences_of_the_grammar(compiler, tokenizer, closing_bias):
    results = walks(compiler, tokenizer, closing_bias, ResponseFormat("grammar", ARITHMETIC))
    for ids, text in results:
        assert re.fullmatch(r"[0-9+\-*/()]+", text), text
        tree = ast.parse(text, mode="eval")  # the grammar's sentences are Python expressions of numbers
        assert all(isinstance(node, (ast.Expression, ast.BinOp, ast.Constant, ast.operator)) for node in ast.walk(tree))
    assert any("(" in text for _, text in results)


def test_a_spanish_grammar_with_non_ascii_classes(compiler, tokenizer, closing_bias):
    grammar = 'root ::= "¿" [a-zñáéíóú]{1,8} (" " [a-zñáéíóú]{1,8}){0,3} "?"'
    for ids, text in walks(compiler, tokenizer, closing_bias, ResponseFormat("grammar", grammar)):
        assert re.fullmatch(r"¿[a-zñáéíóú]{1,8}( [a-zñáéíóú]{1,8}){0,3}\?", text), text


CALLS_SCHEMA = {
    "type": "array", "minItems": 1,
    "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"const": "get_weather"},
                                          "arguments": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"], "additionalProperties": False}},
         "required": ["name", "arguments"], "additionalProperties": False},
        {"type": "object", "properties": {"name": {"const": "now"}, "arguments": {"type": "object"}},
         "required": ["name", "arguments"], "additionalProperties": False},
    ]},
}


def test_tool_calls_walks_are_the_token_then_a_list_of_calls(compiler, tokenizer, closing_bias):
    for ids, text in walks(compiler, tokenizer, closing_bias, ResponseFormat("tool_calls", json.dumps(CALLS_SCHEMA))):
        assert ids[0] == TOOL_CALLS_ID
        assert tokenizer.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP) == "[TOOL_CALLS]" + text
        calls = json.loads(text)
        jsonschema.validate(calls, CALLS_SCHEMA)
        assert text == json.dumps(calls, ensure_ascii=False) or "\\" in text, "written as mistral-common writes calls"


@pytest.mark.parametrize("fmt_args, words", [
    (("json_schema", "{not json"), "not valid JSON"),
    (("json_schema", "[1, 2]"), "object"),
    (("json_schema", '{"type": "nonsense"}'), "nonsense"),
    (("json_schema", '{"$ref": "#/$defs/missing"}'), "$defs"),
    (("json_schema", json.dumps({"type": "string", "maxLength": MAX_REPEAT + 1})), "maxLength"),
    (("json_schema", json.dumps({"type": "string", "pattern": "a{1,99999}"})), "repetition count 99999"),
    (("regex", "(ab"), "parenthesis"),
    (("regex", r"(?<=a)b"), "Lookbehind"),
    (("regex", r"(a)\1"), "Backreference"),
    (("regex", "[a-z]{1,20000}"), "repetition count 20000"),
    (("grammar", "root ::= foo"), "foo"),
    (("grammar", 'rot ::= "a"'), "root"),
    (("grammar", 'root ::= "a'), "line 1"),
    (("tool_calls", "{"), "not valid JSON"),
])
def test_formats_that_cannot_compile_raise_with_the_reason(compiler, fmt_args, words):
    with pytest.raises(FormatError) as raised:
        compiler.compile(ResponseFormat(*fmt_args))
    message = str(raised.value)
    assert message.startswith(fmt_args[0] + ": ") and words in message
    assert "/project" not in message and ".cc:" not in message and "\n" not in message


@pytest.mark.parametrize("fmt_args, words", [
    (("text", ""), "must be one of"),
    (("choice", []), "1 to"),
    (("choice", "yes"), "list of strings"),
    (("choice", ["a", 1]), "list of strings"),
    (("choice", [str(i) for i in range(2000)]), "1 to 1024"),
    (("regex", ""), "empty"),
    (("regex", 5), "string"),
    (("json_schema", json.dumps({"enum": ["x" * 100] * 1000})), f"over the limit of {MAX_SPEC_CHARS}"),
])
def test_malformed_formats_are_refused_when_made(fmt_args, words):
    with pytest.raises(FormatError, match=re.escape(words)):
        ResponseFormat(*fmt_args)


def test_the_cache_returns_one_compiled_object_per_format_text(tokenizer):
    compiler = FormatCompiler(tokenizer, max_entries=2)
    first = compiler.compile(ResponseFormat("regex", "a+"))
    assert compiler.compile(ResponseFormat("regex", "a+")) is first
    deduplicated = compiler.compile(ResponseFormat("choice", ["x", "y", "x"]))
    assert compiler.compile(ResponseFormat("choice", ("x", "y"))) is deduplicated
    assert compiler.compile(ResponseFormat("regex", "a+ ")) is not first, "the text is the key"
    assert len(compiler) == 2
    assert compiler.compile(ResponseFormat("regex", "a+")) is not first, "the least recently used was evicted"


def test_a_failed_format_is_remembered_and_raises_each_time(tokenizer):
    compiler = FormatCompiler(tokenizer)
    calls = []
    build = compiler._build
    compiler._build = lambda kind, spec: calls.append(kind) or build(kind, spec)
    for _ in range(3):
        with pytest.raises(FormatError, match="parenthesis"):
            compiler.compile(ResponseFormat("regex", "(a"))
    assert calls == ["regex"]


def test_threads_compiling_one_format_at_once_share_one_compilation(tokenizer):
    compiler = FormatCompiler(tokenizer)
    calls = []
    build = compiler._build
    compiler._build = lambda kind, spec: calls.append(kind) or build(kind, spec)
    fmt = ResponseFormat("json_schema", json.dumps(PERSON_SCHEMA))
    barrier = threading.Barrier(6)
    results = []

    def compile_one():
        barrier.wait()
        results.append(compiler.compile(fmt))

    threads = [threading.Thread(target=compile_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6 and all(result is results[0] for result in results)
    assert calls == ["json_schema"]


def test_a_rejected_token_leaves_the_matcher_where_it_was(compiler, tokenizer):
    raw = tokenizer.instruct_tokenizer.tokenizer
    matcher = compiler.compile(ResponseFormat("choice", ["yes", "no"])).matcher()
    bitmask = allocate_bitmask(2)
    matcher.fill_bitmask(bitmask, 0)
    assert not matcher.accept(raw.encode("maybe", bos=False, eos=False)[0])
    assert not matcher.accept(TOOL_CALLS_ID)
    matcher.fill_bitmask(bitmask, 1)
    assert torch.equal(bitmask[0], bitmask[1])


def test_once_terminated_only_eos_is_allowed_and_rollback_undoes_tokens(compiler, tokenizer):
    raw = tokenizer.instruct_tokenizer.tokenizer
    matcher = compiler.compile(ResponseFormat("regex", "(ab)+")).matcher()
    bitmask = allocate_bitmask(3)
    matcher.fill_bitmask(bitmask, 0)
    ids = raw.encode("ababab", bos=False, eos=False)
    assert all(matcher.accept(token_id) for token_id in ids)
    assert matcher.is_completed and not matcher.is_terminated
    matcher.fill_bitmask(bitmask, 1)
    assert allowed_tokens(bitmask[1])[EOS_ID]
    assert matcher.accept(EOS_ID) and matcher.is_terminated
    matcher.fill_bitmask(bitmask, 2)
    assert allowed_tokens(bitmask[2]).nonzero().flatten().tolist() == [EOS_ID]
    assert not matcher.accept(ids[0])
    matcher.rollback(len(ids) + 1)
    assert not matcher.is_terminated and not matcher.is_completed
    matcher.fill_bitmask(bitmask, 2)
    assert torch.equal(bitmask[0], bitmask[2])


def test_batch_masks_touch_only_the_rows_with_a_format(compiler, tokenizer):
    raw = tokenizer.instruct_tokenizer.tokenizer
    json_matcher = compiler.compile(ResponseFormat("json_object")).matcher()
    choice_matcher = compiler.compile(ResponseFormat("choice", ["yes", "no"])).matcher()
    finished = compiler.compile(ResponseFormat("choice", ["ok"])).matcher()
    assert all(finished.accept(token_id) for token_id in raw.encode("ok", bos=False, eos=False) + [EOS_ID])
    bitmask = allocate_bitmask(5)
    rows = fill_bitmasks([json_matcher, None, choice_matcher, finished, None], bitmask)
    assert rows == [0, 2, 3]
    assert (bitmask[1] == -1).all() and (bitmask[4] == -1).all()
    for row, matcher in ((0, json_matcher), (2, choice_matcher), (3, finished)):
        single = allocate_bitmask(1)
        matcher.fill_bitmask(single, 0)
        assert torch.equal(bitmask[row], single[0])

    logits = torch.randn(5, VOCAB_SIZE)
    expected = logits.clone()
    for row in rows:
        expected[row][~allowed_tokens(bitmask[row])] = float("-inf")
    apply_bitmask(logits, bitmask, rows)
    assert torch.equal(logits, expected)
    assert torch.isfinite(logits[1]).all() and torch.isfinite(logits[4]).all()
    assert torch.isfinite(logits[3]).nonzero().flatten().tolist() == [EOS_ID]
    untouched = logits.clone()
    apply_bitmask(logits, bitmask, [])
    assert torch.equal(logits, untouched)
