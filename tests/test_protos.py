"""The committed generated code matches the protos, and every field is documented."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support import ROOT, child_env


def test_generated_code_is_not_stale():
    result = subprocess.run([sys.executable, "protos/generate.py", "--check"], cwd=ROOT, env=child_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_field_enum_value_and_rpc_has_a_comment():
    for proto in (ROOT / "protos" / "pixtral" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            is_member = (re.match(r"^(optional |repeated )?[\w.]+ \w+ = \d+;", stripped)   # fields
                         or re.match(r"^[A-Z][A-Z0-9_]* = \d+;", stripped)                 # enum values
                         or stripped.startswith(("rpc ", "message ", "enum ", "service ")))
            if not is_member:
                continue
            assert lines[number - 1].strip().startswith("//"), f"{proto.name}:{number + 1}: {stripped}"
