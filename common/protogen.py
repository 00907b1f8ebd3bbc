"""Generates `generate_pb2.py` and `generate_pb2_grpc.py` from `proto/generate.proto`.

The proto is mapped onto the import path `common/pb/`, so the generated gRPC module imports
`common.pb.generate_pb2` and works inside this package.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto" / "generate.proto"
OUT_DIR = ROOT / "common" / "pb"
OUTPUTS = (OUT_DIR / "generate_pb2.py", OUT_DIR / "generate_pb2_grpc.py")


def is_stale() -> bool:
    """True when a stub is missing or older than the proto."""
    if not PROTO.exists():
        return not all(p.exists() for p in OUTPUTS)
    newest = PROTO.stat().st_mtime
    return any(not p.exists() or p.stat().st_mtime < newest for p in OUTPUTS)


def generate() -> None:
    """Runs protoc (from grpcio-tools); raises RuntimeError when it fails."""
    from grpc_tools import protoc  # imported here: only building needs grpcio-tools

    args = [
        "grpc_tools.protoc",
        f"-Icommon/pb={PROTO.parent}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--pyi_out={ROOT}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    make_portable()


# The stubs refuse to import under an older protobuf or grpcio than the generator's. The
# calls they make (AddSerializedFile + builder, channel.unary_unary) are stable across
# protobuf >= 3.20 and grpcio >= 1.62, so the guards are removed: the same stubs then
# import on a GPU machine whose packages are older or newer than ours.
_GUARDS = (
    re.compile(r"^from google\.protobuf import runtime_version as _runtime_version\n", re.M),
    re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n", re.M),
    re.compile(r"^GRPC_GENERATED_VERSION = .*?^    \)\n", re.M | re.S),
)


def make_portable() -> None:
    """Strips the generator-version guards from the generated stubs (see _GUARDS)."""
    for path in OUTPUTS:
        text = path.read_text()
        for guard in _GUARDS:
            text = guard.sub("", text)
        path.write_text(text)


if __name__ == "__main__":
    generate()
