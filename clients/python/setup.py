"""The build hook: the stubs and the .proto files go into the package as it is built,
generated from the repository's protos/ (gen_protos.py), never committed."""

import pathlib
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gen_protos  # noqa: E402


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        if gen_protos.generate(gen_protos.PROTO_DIR, pathlib.Path(self.build_lib).resolve()) != 0:
            raise SystemExit(f"could not generate the stubs from {gen_protos.PROTO_DIR}: build from the repository's clients/python")


setup(cmdclass={"build_py": BuildWithStubs})
