"""Streaming text: multi-byte characters never split, stop strings never leak."""

from __future__ import annotations

from services.gateway.detokenizer import IncrementalDetokenizer, StopMatcher
from shared.tokenizer import load_tokenizer


def test_multibyte_characters_come_out_whole_when_fed_token_by_token():
    tokenizer = load_tokenizer()
    text = "Smile 🙂, 中文 and Ünïcödé! 🎉🎉"
    ids = tokenizer.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add([token]) for token in ids] + [detokenizer.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)
    assert any(delta == "" for delta in deltas), "some token held back an incomplete character"


def test_special_tokens_produce_no_text():
    detokenizer = IncrementalDetokenizer(load_tokenizer())
    assert detokenizer.add([1, 2, 3, 10]) == ""


def test_stop_string_split_across_deltas_is_cut_and_never_emitted():
    matcher = StopMatcher(("STOP",))
    out = []
    for piece in ["Hello S", "T", "O", "P and more"]:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello " and stopped


def test_text_held_back_for_a_possible_stop_is_released_when_it_is_not_one():
    matcher = StopMatcher(("</answer>",))
    assert matcher.feed("a </ans") == ("a ", False)
    assert matcher.feed("wer? no") == ("</answer? no", False)
    assert matcher.feed(" <") == (" ", False)
    assert matcher.flush() == "<"


def test_earliest_of_several_stops_wins():
    matcher = StopMatcher(("world", "lo w"))
    assert matcher.feed("hello world") == ("hel", True)
