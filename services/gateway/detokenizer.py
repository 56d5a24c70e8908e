"""Streaming text from token ids: UTF-8 safe incremental decoding, and stop strings."""

from __future__ import annotations

import codecs

from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy


class IncrementalDetokenizer:
    """Token ids -> text deltas. A multi-byte character split across tokens comes out whole, once complete."""

    def __init__(self, tokenizer) -> None:
        self._raw = tokenizer.instruct_tokenizer.tokenizer  # Tekkenizer: byte pieces per id
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_ids: list[int]) -> str:
        data = b"".join(self._raw.id_to_byte_piece(token_id, SpecialTokenPolicy.IGNORE) for token_id in token_ids)
        return self._decoder.decode(data)

    def flush(self) -> str:
        """Whatever is left at the end of the stream (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Holds back text that may be the start of a stop string; reports the first complete match."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.matched: str | None = None   # the stop string that matched, once one has
        self._held = ""
        self._longest = max((len(stop) for stop in stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string matched). After a match, nothing more."""
        if not self.stops:
            return text, False
        buffer = self._held + text
        matches = [(index, stop) for index, stop in ((buffer.find(stop), stop) for stop in self.stops) if index >= 0]
        if matches:
            self._held = ""
            index, self.matched = min(matches)
            return buffer[:index], True
        keep = self._longest_partial(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def _longest_partial(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        for length in range(min(self._longest - 1, len(buffer)), 0, -1):
            suffix = buffer[-length:]
            if any(stop.startswith(suffix) for stop in self.stops):
                return length
        return 0

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
