"""The router never imports torch or the shard."""

from __future__ import annotations

import subprocess
import sys


def test_router_does_not_import_torch_or_shard():
    code = (
        "import sys, router.cli, router.app, router.scheduler, router.client; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.') or m == 'shard' or m.startswith('shard.')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
