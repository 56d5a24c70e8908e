"""bench/py_spy_summary.py: shares of a py-spy profile's samples (collapsed stacks, as py-spy's raw format)."""

from __future__ import annotations

from bench.py_spy_summary import main, summarize

RAW = """\
_bootstrap (threading.py:1002);Engine._loop (services/decoder/engine.py:90);Event.synchronize (torch/cuda/streams.py:220) 6
_bootstrap (threading.py:1002);Engine._loop (services/decoder/engine.py:91);Engine.launch (services/decoder/engine.py:140) 2
run (asyncio/runners.py:190);write_all (shared/streams.py:24) 2
"""


def test_shares_count_a_functions_lines_together_and_within_the_frame_asked(tmp_path, capsys):
    path = tmp_path / "decoder.raw"
    path.write_text(RAW)
    total, inclusive, own, own_within = summarize(str(path), "Engine._loop")
    assert total == 10
    assert inclusive["Engine._loop (services/decoder/engine.py)"] == 8   # two lines of one function
    assert own["write_all (shared/streams.py)"] == 2 and own_within["write_all (shared/streams.py)"] == 0
    assert own_within["Event.synchronize (torch/cuda/streams.py)"] == 6
    assert main([str(path), "--seconds", "0.1", "--rate", "200", "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("10 samples, 50% of the time recorded")
    assert " 60.0%  Event.synchronize (torch/cuda/streams.py)  (75% of Engine._loop)" in printed
