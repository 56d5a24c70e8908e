"""Generates the Python code of the protos into the importable package `pixtral.v1` at the repository root.

The generated files are committed so that a checkout runs without a build step; `--check` regenerates into a
temporary folder and fails when the committed files differ (tests/test_protos.py runs it).

    python protos/generate.py           # write pixtral/v1/*_pb2*.py
    python protos/generate.py --check   # exit 1 if they are stale
"""

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("pixtral") / "v1"
INIT_TEXT = '"""Generated from protos/pixtral/v1 by protos/generate.py: do not edit."""\n'


def generate(out_root: Path) -> list[Path]:
    protos = sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in (out_root / "pixtral", out_root / PACKAGE):
        (package / "__init__.py").write_text(INIT_TEXT)
    return sorted(p.relative_to(out_root) for p in (out_root / "pixtral").rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    check = parser.parse_args().check
    if not check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [str(rel) for rel in fresh
                 if not (ROOT / rel).exists() or not filecmp.cmp(Path(tmp) / rel, ROOT / rel, shallow=False)]
    if stale:
        print("stale generated code, run `python protos/generate.py`: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
