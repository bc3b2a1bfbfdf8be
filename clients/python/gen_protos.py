"""Generates the Python stubs of protos/ into the client package (never committed):
the one generation of the project.

`make protos` runs it into clients/python/, so that devops_hub/v1/ holds the stubs
the services and tests import (the .venv puts clients/python on the path); the
package's build (setup.py) runs it into the wheel's build folder, so a wheel or
`pip install ./clients/python` carries them. Either way the .proto files are copied
beside them, to devops_hub/protos/. The include path comes from the installed
packages, so google/api and google/protobuf imports resolve without vendoring any
.proto file. `--protos` and `--out` generate another tree the same way
(tests/test_adding_a_service.py compiles the project's protos plus a new one).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

HERE = pathlib.Path(__file__).resolve().parent
PROTO_DIR = HERE.parent.parent / "protos"
COPY_DIR = pathlib.Path("devops_hub", "protos")
# With the comments, which the stubs leave out: the gateway's OpenAPI document
# describes every operation and field in the protos' own words from it.
DESCRIPTOR_SET = pathlib.Path("devops_hub", "descriptor_set.pb")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generates the Python stubs of a tree of .proto files.")
    parser.add_argument("--protos", type=pathlib.Path, default=PROTO_DIR, help="the tree of .proto files")
    parser.add_argument("--out", type=pathlib.Path, default=HERE, help="where the package's folders are (theirs emptied first)")
    args = parser.parse_args(argv)
    return generate(args.protos.resolve(), args.out.resolve())


def generate(proto_dir: pathlib.Path, out_dir: pathlib.Path) -> int:
    # Imported here: setup.py imports this module before its build requirements are checked.
    import google.api
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(p.relative_to(proto_dir) for p in proto_dir.rglob("*.proto"))
    if not protos:
        print(f"no .proto files under {proto_dir}", file=sys.stderr)
        return 1
    # Only the generated folders are emptied: devops_hub/ itself holds the client's code.
    for folder in {p.parent for p in protos} | {COPY_DIR}:
        shutil.rmtree(out_dir / folder, ignore_errors=True)
    googleapis = pathlib.Path(google.api.__path__[0]).parent.parent
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    protoc_args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{googleapis}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--descriptor_set_out={out_dir / DESCRIPTOR_SET}",
        "--include_imports",
        "--include_source_info",
        *map(str, protos),
    ]
    if protoc.main(protoc_args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for proto in protos:
        # Every generated folder a regular package; the sources beside the stubs.
        for folder in proto.parents:
            if folder.parts:
                (out_dir / folder / "__init__.py").touch()
        (out_dir / COPY_DIR / proto).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(proto_dir / proto, out_dir / COPY_DIR / proto)
    print(f"generated {len(protos)} proto files into {out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
