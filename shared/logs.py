"""JSON log lines on stderr, each carrying the role and, inside a request, its request id.

Every line a role writes to stderr is a JSON object, also those it does not write through `logging`: gRPC core's
own log lines (`I1201 12:00:00.123456 42 chttp2_transport.cc:1403] ... Got goaway`), a C library's warning, a
Python traceback. `setup_logging` points file descriptor 2 at a pipe read by a small process of its own (`python
-m shared.logs ROLE`), which wraps each line in the role's JSON form, its level from the line's first letter (gRPC
core's and absl's I/W/E/F). A process, not a thread: it reads to the end of the pipe after the role has exited, so
nothing is lost at exit, not even the line of a fatal error written just before an abort. It ignores SIGINT and
SIGTERM (a Ctrl-C reaches the whole process group) and ends when the pipe closes.

The role's own log lines do not take that detour: they are written to the original stderr at once, each in one
write, so a line logged before the role tells anyone of an event is there to be read when they are told.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# A request id travels in every error's trailing metadata: what gRPC accepts in an ASCII metadata value. A value
# outside it fails the whole call as INTERNAL ("Invalid metadata"), which would hide the error it accompanies.
_METADATA_SAFE_ID = re.compile(r"^[\x20-\x7e]{1,1024}$")


def is_metadata_safe(request_id: str) -> bool:
    """Printable ASCII, 1 to 1,024 characters: an id that can go back to the caller in metadata."""
    return bool(_METADATA_SAFE_ID.match(request_id))

# The logger name of lines that reached stderr without going through logging.
STDERR_LOGGER = "stderr"
# gRPC core and absl: "I1201 12:00:00.123456  4242 file.cc:12] text"; torch's C++: "[W1201 12:00:00.1 file.cpp:3]".
_NATIVE_LINE = re.compile(rb"^\[?([IWEF])\d{4} \d\d:\d\d:\d\d")
_NATIVE_LEVELS = {b"I": "info", b"W": "warning", b"E": "error", b"F": "critical"}
# absl before its logging is set up: "WARNING: All log messages before absl::InitializeLog() is called are ..."
_WORD_LEVEL = re.compile(rb"^(DEBUG|INFO|WARNING|ERROR|CRITICAL|FATAL)\b")

_stderr_pump: subprocess.Popen | None = None


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "role": self.role,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(role: str, level: str = "info", json_stderr: bool = True) -> None:
    """JSON logs of `role` at `level` on stderr; with `json_stderr`, whatever else reaches stderr is made JSON too
    (once per process: a role calls this first thing)."""
    stream = _WholeLines(route_stderr(role)) if json_stderr else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "urllib3", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)   # warnings.warn: a JSON line of logger py.warnings, not two plain lines

    def log_uncaught(kind, error, traceback) -> None:
        logging.getLogger(role).critical("uncaught %s: %s", kind.__name__, error, exc_info=(kind, error, traceback))

    def log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not SystemExit:   # threading's own hook ignores it too
            log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = log_uncaught
    threading.excepthook = log_uncaught_in_thread


class _WholeLines:
    """A text stream over a file descriptor that writes each message with one write call (a log line is never
    interleaved with a line the pump writes to the same file)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, text: str) -> None:
        data = text.encode("utf-8", errors="backslashreplace")
        while data:
            data = data[os.write(self.fd, data):]

    def flush(self) -> None:
        pass


_original_stderr: int | None = None


def route_stderr(role: str) -> int:
    """Points file descriptor 2 at the pump process (see the module's docstring), whose output is the original
    stderr; returns a descriptor of the original stderr (2 itself if the pump cannot start)."""
    global _stderr_pump, _original_stderr
    if _original_stderr is not None:
        return _original_stderr
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    try:
        _stderr_pump = subprocess.Popen([sys.executable, "-m", "shared.logs", role], stdin=read_end, stdout=2,
                                        stderr=2, env=env, close_fds=True)
    except OSError as error:
        os.close(write_end)
        logging.getLogger(__name__).warning("stderr left as it is: %s", error)
        return 2
    finally:
        os.close(read_end)
    _original_stderr = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    return _original_stderr


def json_line(line: bytes, role: str) -> bytes | None:
    """One line of stderr (without its newline) -> the JSON line to write, or None for a blank line."""
    line = line.rstrip(b"\r\n")
    if not line.strip():
        return None
    if line.startswith(b"{"):
        try:
            if isinstance(json.loads(line), dict):
                return line + b"\n"
        except ValueError:
            pass
    native = _NATIVE_LINE.match(line)
    word = _WORD_LEVEL.match(line)
    if native:
        level = _NATIVE_LEVELS[native.group(1)]
    elif word:
        level = {"fatal": "critical"}.get(word.group(1).decode().lower(), word.group(1).decode().lower())
    else:
        level = "warning"   # something unstructured reached stderr: worth a look
    entry = {"ts": round(time.time(), 3), "level": level, "role": role, "logger": STDERR_LOGGER,
             "msg": line.decode("utf-8", errors="replace")}
    return json.dumps(entry, ensure_ascii=False).encode() + b"\n"


def _pump(role: str) -> None:
    """Copies stdin to stdout line by line as JSON, until stdin ends (every writer of the role's stderr gone)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    is_open = True
    for line in sys.stdin.buffer:
        out = json_line(line, role)
        if out is None or not is_open:
            continue   # read on even when stdout is gone: the role must never block on its stderr
        try:
            while out:
                out = out[os.write(1, out):]
        except OSError:
            is_open = False


if __name__ == "__main__":
    _pump(sys.argv[1] if len(sys.argv) > 1 else "unknown")
