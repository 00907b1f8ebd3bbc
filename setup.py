"""Generates the gRPC stubs from proto/generate.proto as part of every build or install."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProto(build_py):
    def run(self) -> None:
        from common.protogen import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProto})
