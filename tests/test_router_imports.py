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


def test_the_launcher_imports_no_torch_even_to_check_a_model(tiny_model_dir):
    """The launcher checks the model and spawns processes: torch would cost it ~700 MiB,
    and it reads the model's config through common/, never the shard's code."""
    code = (
        "import sys, launcher.cli, launcher.supervisor; "
        f"launcher.supervisor.resolve_model({str(tiny_model_dir)!r}, 1); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'shard')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_packages_have_no_import_cycle():
    """Every import between the project's modules (function-local and TYPE_CHECKING ones
    too) forms a graph without cycles: each boundary has one owner."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [
        p
        for package in ("common", "router", "shard", "launcher", "pytgi_benchmark")
        for p in (root / package).rglob("*.py")
        if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    ]
    modules = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for p in files
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert len(modules) > 50 and not cycles, cycles
