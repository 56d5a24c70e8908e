"""Structured output: response formats compiled by xgrammar into token masks over the Tekken vocabulary.

A `ResponseFormat` says what the output must be; `FormatCompiler.compile` turns it into a `CompiledFormat`
(cached: one per format text); each sequence that uses it gets its own `FormatMatcher`, which fills the
sequence's row of a batch bitmask before each step and accepts the token sampled after it.

The vocabulary given to xgrammar is Tekken's byte piece of every id (131072). Ordinary pieces are bytes, some
of them not valid UTF-8 on their own (a character split across tokens): xgrammar matches bytes, so those work.
The control tokens (ids < 1000: [INST], [IMG], [TOOL_CALLS], ...) are given as 0xFF followed by their name.
0xFF never occurs in UTF-8 and every grammar here matches UTF-8 text, so no grammar produces a control token
by spelling it out, while a grammar that names one by id (the tool-call grammar starts with [TOOL_CALLS]) still
gets it. Given as empty pieces instead, xgrammar would refuse them even where a grammar names them; given as
their names, "[INST]" would be a way to write those six characters inside any JSON string.

xgrammar rather than llguidance: it is the one installed, its structural tags name tokens by id, and it brings
the bitmask kernels for CPU and CUDA. (mistral-common's own grammars, `mistral_common.guidance`, need llguidance
and a Tekken tokenizer of v11 or later; Pixtral's is v3.)
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import xgrammar as xgr
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from shared.format_checks import FormatError, check_repeats, check_schema, library_message
from shared.tokenizer import load_tokenizer

VOCAB_SIZE = 131072
NUM_CONTROL_TOKENS = 1000
EOS_ID = 2
TOOL_CALLS_ID = 9
KINDS = ("json_object", "json_schema", "regex", "choice", "grammar", "tool_calls")

MAX_SPEC_CHARS = 1 << 16       # a schema, regex or grammar's text; the choices together
MAX_CHOICES = 1024
MAX_COMPILED_BYTES = 64 << 20  # what xgrammar's compiled form of one format may hold
# Whitespace between JSON elements, per gap: enough for indented output, and a model that falls into a loop
# of whitespace has to write the next element rather than fill max_tokens with blanks.
MAX_JSON_WHITESPACE = 32
# The tool-call grammar writes the calls as mistral-common writes them in the history (json.dumps defaults).
TOOL_CALL_SEPARATORS = (", ", ": ")

# Bitmask row that allows EOS alone: bit 2 of the first 32-bit word.
EOS_ONLY_ROW = torch.zeros(xgr.get_bitmask_shape(1, VOCAB_SIZE)[1], dtype=xgr.bitmask_dtype)
EOS_ONLY_ROW[EOS_ID // 32] = 1 << (EOS_ID % 32)


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """What a completion must be. `spec` by kind: json_object: unused; json_schema: the schema's JSON text;
    regex: the pattern (the whole output matches it); choice: the strings, the output is exactly one of them;
    grammar: EBNF (xgrammar's GBNF dialect, root rule `root`); tool_calls: the JSON schema of the list of calls
    that follows [TOOL_CALLS] (see shared/tool_calls.py)."""

    kind: str
    spec: str | tuple[str, ...] = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FormatError(f"type: must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind == "choice":
            if isinstance(self.spec, str) or not all(isinstance(item, str) for item in self.spec):
                raise FormatError("choice: must be a list of strings")
            choices = tuple(dict.fromkeys(self.spec))  # duplicates removed, order kept
            if not choices or len(choices) > MAX_CHOICES:
                raise FormatError(f"choice: must have 1 to {MAX_CHOICES} strings, got {len(choices)}")
            object.__setattr__(self, "spec", choices)
            size = sum(len(item) for item in choices)
        else:
            if not isinstance(self.spec, str):
                raise FormatError(f"{self.kind}: must be a string")
            if self.kind == "json_object":
                object.__setattr__(self, "spec", "")  # any object: nothing to say
            elif not self.spec.strip():
                raise FormatError(f"{self.kind}: is empty")
            size = len(self.spec)
        if size > MAX_SPEC_CHARS:
            raise FormatError(f"{self.kind}: {size} characters, over the limit of {MAX_SPEC_CHARS}")


class CompiledFormat:
    """A format compiled against the Tekken vocabulary; shared, read-only: make one matcher per sequence."""

    __slots__ = ("format", "grammar")

    def __init__(self, fmt: ResponseFormat, grammar: xgr.CompiledGrammar) -> None:
        self.format = fmt
        self.grammar = grammar

    @property
    def memory_size_bytes(self) -> int:
        return self.grammar.memory_size_bytes

    def matcher(self) -> FormatMatcher:
        return FormatMatcher(self)


class FormatMatcher:
    """One sequence's position in its format. Not thread-safe: one owner (the engine's thread)."""

    __slots__ = ("compiled", "_matcher")

    def __init__(self, compiled: CompiledFormat) -> None:
        self.compiled = compiled
        self._matcher = xgr.GrammarMatcher(compiled.grammar)

    @property
    def xgrammar_matcher(self) -> xgr.GrammarMatcher:
        """The library's matcher, for filling many rows at once (format_bitmasks.fill_bitmasks)."""
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """Advances by one sampled token; False (and no change) if the format does not allow it."""
        return self._matcher.accept_token(token_id)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the tokens allowed next into `bitmask[row]` (CPU int32, from `allocate_bitmask`)."""
        if self._matcher.is_terminated():
            bitmask[row] = EOS_ONLY_ROW
        else:
            self._matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def is_completed(self) -> bool:
        """The output so far is a whole instance of the format: EOS is allowed (maybe more text too)."""
        return self._matcher.is_completed()

    @property
    def is_terminated(self) -> bool:
        """EOS was accepted: the output is finished and only EOS is allowed from here."""
        return self._matcher.is_terminated()

    def rollback(self, num_tokens: int) -> None:
        """Undoes the last `num_tokens` accepted tokens (cheap: xgrammar keeps the history). Only speculative
        decoding needs it; preemption keeps the accepted tokens, so a sequence's matcher stays as it is."""
        self._matcher.rollback(num_tokens)


def tekken_tokenizer_info(tokenizer: MistralTokenizer) -> xgr.TokenizerInfo:
    """The Tekken vocabulary as xgrammar sees it (see the module docstring for the control tokens)."""
    raw = tokenizer.instruct_tokenizer.tokenizer
    if raw.n_words != VOCAB_SIZE or raw.num_special_tokens != NUM_CONTROL_TOKENS:
        raise ValueError(f"expected the Tekken vocabulary ({VOCAB_SIZE} ids, {NUM_CONTROL_TOKENS} control tokens), "
                         f"got {raw.n_words} and {raw.num_special_tokens}")
    pieces = [raw.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP) for token_id in range(VOCAB_SIZE)]
    for token_id in range(NUM_CONTROL_TOKENS):
        pieces[token_id] = b"\xff" + pieces[token_id]
    return xgr.TokenizerInfo(pieces, xgr.VocabType.RAW, vocab_size=VOCAB_SIZE, stop_token_ids=[EOS_ID])


class FormatCompiler:
    """Compiles formats, keeping the most recently used ones (and the reasons of those that failed). Thread-safe:
    callers of one format at once share a single compilation."""

    def __init__(self, tokenizer: MistralTokenizer, max_entries: int = 256, max_bytes: int = 256 << 20,
                 max_threads: int | None = None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.tokenizer_info = tekken_tokenizer_info(tokenizer)
        # xgrammar's own cache is off: it has no bound by default, and this one is keyed the same way.
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, cache_enabled=False,
                                             max_threads=max_threads or min(8, os.cpu_count() or 1))
        self._lock = threading.Lock()
        self._entries: OrderedDict[ResponseFormat, CompiledFormat | str] = OrderedDict()  # str: why it failed
        self._num_bytes = 0
        self._pending: dict[ResponseFormat, Future] = {}

    def compile(self, fmt: ResponseFormat) -> CompiledFormat:
        """The compiled format, from the cache when the same kind and text were compiled before; raises
        FormatError for one that cannot be compiled."""
        with self._lock:
            entry = self._entries.get(fmt)
            if entry is not None:
                self._entries.move_to_end(fmt)
                pending = None
            else:
                pending = self._pending.get(fmt)
                is_owner = pending is None
                if is_owner:
                    pending = self._pending[fmt] = Future()
        if pending is not None:
            entry = self._compile_once(fmt, pending) if is_owner else pending.result()
        if isinstance(entry, str):
            raise FormatError(entry)
        return entry

    def _compile_once(self, fmt: ResponseFormat, pending: Future) -> CompiledFormat | str:
        try:
            try:
                entry: CompiledFormat | str = CompiledFormat(fmt, self._compile(fmt))
            except FormatError as error:
                entry = str(error)
        except BaseException as error:
            with self._lock:
                del self._pending[fmt]
            pending.set_exception(error)
            raise
        with self._lock:
            del self._pending[fmt]
            self._store(fmt, entry)
        pending.set_result(entry)
        return entry

    def _store(self, fmt: ResponseFormat, entry: CompiledFormat | str) -> None:
        self._entries[fmt] = entry
        self._num_bytes += _num_bytes(entry)
        while self._entries and (len(self._entries) > self.max_entries or self._num_bytes > self.max_bytes):
            _, evicted = self._entries.popitem(last=False)
            self._num_bytes -= _num_bytes(evicted)

    def __len__(self) -> int:
        return len(self._entries)

    def _compile(self, fmt: ResponseFormat) -> xgr.CompiledGrammar:
        if fmt.kind in ("json_schema", "tool_calls"):
            check_schema(fmt.spec, fmt.kind)
        elif fmt.kind in ("regex", "grammar"):
            check_repeats(fmt.spec, fmt.kind)
        try:
            grammar = self._build(fmt.kind, fmt.spec)
        except (RuntimeError, ValueError, TypeError) as error:
            raise FormatError(f"{fmt.kind}: {library_message(error)}") from None
        if grammar.memory_size_bytes > MAX_COMPILED_BYTES:
            raise FormatError(f"{fmt.kind}: compiles to {grammar.memory_size_bytes >> 20} MiB, over the limit of "
                              f"{MAX_COMPILED_BYTES >> 20} MiB")
        return grammar

    def _build(self, kind: str, spec: str | tuple[str, ...]) -> xgr.CompiledGrammar:
        if kind == "json_object":
            return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=True,
                                                      max_whitespace_cnt=MAX_JSON_WHITESPACE)
        if kind == "json_schema":
            return self._compiler.compile_json_schema(spec, any_whitespace=True,
                                                      max_whitespace_cnt=MAX_JSON_WHITESPACE)
        if kind == "regex":
            return self._compiler.compile_regex(spec)
        if kind == "grammar":
            return self._compiler.compile_grammar(spec)
        if kind == "choice":
            return self._compiler.compile_structural_tag({"type": "structural_tag", "format": {
                "type": "or", "elements": [{"type": "const_string", "value": item} for item in spec]}})
        calls = xgr.Grammar.from_json_schema(spec, any_whitespace=False, separators=TOOL_CALL_SEPARATORS)
        start = xgr.Grammar.from_structural_tag(
            {"type": "structural_tag", "format": {"type": "token", "token": TOOL_CALLS_ID}})
        return self._compiler.compile_grammar(xgr.Grammar.concat(start, calls))


def _num_bytes(entry: CompiledFormat | str) -> int:
    return 0 if isinstance(entry, str) else entry.memory_size_bytes


_DEFAULT_LOCK = threading.Lock()


def default_compiler() -> FormatCompiler:
    """The process's compiler over the Pixtral tokenizer; built once (about a second) even when several threads
    ask for it at once."""
    with _DEFAULT_LOCK:
        return _default_compiler()


@functools.cache
def _default_compiler() -> FormatCompiler:
    return FormatCompiler(load_tokenizer())


def compile_format(fmt: ResponseFormat) -> CompiledFormat:
    """`default_compiler().compile(fmt)`."""
    return default_compiler().compile(fmt)
