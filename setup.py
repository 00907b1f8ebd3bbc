"""Generates the gRPC stubs from proto/generate.proto as part of every build or install."""

import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


class BuildWithProto(build_py):
    def run(self) -> None:
        sys.path.insert(0, ROOT)  # the isolated build env does not see the project's packages
        from common.protogen import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProto})
