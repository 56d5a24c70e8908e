"""The Pixtral tokenizer (which preprocessing needs too) takes about a second to load: a process loads it once,
also when several threads ask for it at once, and a vision worker before its first job."""

from __future__ import annotations

import concurrent.futures
import time

from shared import tokenizer
from shared.images import warm_up_preprocessing


def test_the_tokenizer_is_loaded_once_when_threads_ask_for_it_at_once(monkeypatch):
    calls = []

    def slow_load(path):
        calls.append(path)
        time.sleep(0.2)   # the real load takes about a second: every thread would start its own
        return object()
    monkeypatch.setattr(tokenizer.MistralTokenizer, "from_file", staticmethod(slow_load))
    tokenizer._load.cache_clear()
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            loaded = list(pool.map(lambda _: tokenizer.load_tokenizer(), range(8)))
        assert len(calls) == 1 and all(each is loaded[0] for each in loaded)
    finally:
        tokenizer._load.cache_clear()   # the real one again for whoever asks next


def test_warming_up_preprocessing_loads_the_tokenizer():
    tokenizer._load.cache_clear()
    warm_up_preprocessing()
    assert tokenizer._load.cache_info().currsize == 1
