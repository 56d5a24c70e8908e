"""Summary of a py-spy profile in its raw (collapsed stacks) format: the share of samples per frame, inclusive and
self, and that of a thread's frame of choice (e.g. the engine thread waiting for the GPU).

    py-spy record --pid PID --gil --nonblocking -d 6 -r 200 --format raw -o decoder_gil.raw
    python -m bench.py_spy_summary decoder_gil.raw --seconds 6 --rate 200 [--top 20] [--within Engine._loop]

With --seconds and --rate, the samples are also given as a share of that time (with --gil: of the time the
process held the GIL).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys


def frame_name(frame: str) -> str:
    """'fn (path:line)' -> 'fn (path)': a function's lines counted together."""
    return re.sub(r":\d+\)$", ")", frame)


def summarize(path: str, within: str = "") -> tuple[int, collections.Counter, collections.Counter,
                                                    collections.Counter]:
    """(samples, inclusive and self counts per frame, self counts of the samples under `within`)."""
    inclusive, own, own_within, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
    with open(path) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            frames, count = [frame_name(f) for f in stack.split(";")], int(count)
            total += count
            for frame in set(frames):
                inclusive[frame] += count
            own[frames[-1]] += count
            if any(frame.startswith(within + " ") for frame in frames):
                own_within[frames[-1]] += count
    return total, inclusive, own, own_within


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--seconds", type=float, help="how long py-spy recorded")
    parser.add_argument("--rate", type=float, help="py-spy's samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--within", default="Engine._loop", help="a frame whose share of its own samples each "
                                                                 "--top frame is also given as")
    args = parser.parse_args(argv)
    total, inclusive, own, own_within = summarize(args.profile, args.within)
    print(f"{total} samples" + (f", {100 * total / (args.seconds * args.rate):.0f}% of the time recorded"
                                if args.seconds and args.rate else ""))
    within = next((count for frame, count in inclusive.items() if frame.startswith(args.within + " ")), 0)
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"-- {title}")
        for frame, count in counter.most_common(args.top):
            share = f"  ({100 * own_within[frame] / within:.0f}% of {args.within})" \
                if within and title == "self" and own_within[frame] else ""
            print(f"{100 * count / total:5.1f}%  {frame}{share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
