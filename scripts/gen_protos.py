"""Generate the Python stubs for protos/ into gen/ (ignored, never committed).

The include path is taken from the installed packages so that google/api and
google/protobuf imports resolve without vendoring any .proto file. `--protos` and
`--out` generate another tree the same way (tests/test_adding_a_service.py compiles
the project's protos plus a new one, as `make protos` would).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

import google.api
import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "gen"
# Inside the generated package, so whoever imports the stubs finds it beside them.
DESCRIPTOR_SET = "devops_hub/descriptor_set.pb"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generates the Python stubs of a tree of .proto files.")
    parser.add_argument("--protos", type=pathlib.Path, default=PROTO_DIR, help="the tree of .proto files")
    parser.add_argument("--out", type=pathlib.Path, default=OUT_DIR, help="where the stubs go (emptied first)")
    args = parser.parse_args(argv)
    return generate(args.protos.resolve(), args.out.resolve())


def generate(proto_dir: pathlib.Path, out_dir: pathlib.Path) -> int:
    protos = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "devops_hub").mkdir(parents=True)
    googleapis = pathlib.Path(google.api.__path__[0]).parent.parent
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protoc_args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{googleapis}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        # With the comments, which the stubs leave out: the gateway's OpenAPI document
        # describes every operation and field in the protos' own words from it.
        f"--descriptor_set_out={out_dir / DESCRIPTOR_SET}",
        "--include_imports",
        "--include_source_info",
        *protos,
    ]
    if protoc.main(protoc_args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    # Make every generated folder a regular package.
    for folder in [out_dir / "devops_hub", *(p for p in (out_dir / "devops_hub").rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    print(f"generated {len(protos)} proto files into {out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
