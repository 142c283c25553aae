"""Parameter lists of the FlashInfer wrapper methods baselines/flashinfer.py calls, read from an unpacked
FlashInfer package (its source, not imported: no GPU needed), as JSON for tests/data/flashinfer_api.json.

    python3 -m pip download --no-deps flashinfer-python==0.7.2 -d /tmp/w && unzip -q /tmp/w/*.whl -d /tmp/fi
    python3 scripts/flashinfer_api_snapshot.py /tmp/fi/flashinfer 0.7.2 tests/data/flashinfer_api.json

Each method maps to its parameter list as Python writes it, defaults shown as `=...` (a test makes a
function of it and binds our calls); an @overload stub is skipped for the implementation that follows it. `_plan_impl` is kept where plan() forwards
**kwargs to it (0.7.2's decode wrapper), so keyword arguments can be checked against it.
"""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

WRAPPERS = ("BatchPrefillWithPagedKVCacheWrapper", "BatchDecodeWithPagedKVCacheWrapper", "BatchAttention",
            "PODWithPagedKVCacheWrapper", "BatchPODWithPagedKVCacheWrapper", "BatchPrefillWithRaggedKVCacheWrapper")
METHODS = ("__init__", "plan", "_plan_impl", "run")


def parameters(fn: ast.FunctionDef) -> str:
    """`(self, a, b=..., *args, c=..., **kw)`: names, kinds and which have defaults (not their values)."""
    a = fn.args
    a.defaults = [ast.Constant(value=...) for _ in a.defaults]
    a.kw_defaults = [None if d is None else ast.Constant(value=...) for d in a.kw_defaults]
    for p in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
        if p is not None:
            p.annotation = None
    return "(" + ast.unparse(a) + ")"


def is_overload(fn: ast.FunctionDef) -> bool:
    return any((isinstance(d, ast.Name) and d.id == "overload") or (isinstance(d, ast.Attribute) and d.attr == "overload")
               for d in fn.decorator_list)


def snapshot(package: Path) -> dict:
    api = {}
    for path in sorted(package.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text())
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name in WRAPPERS:
                for fn in node.body:
                    if isinstance(fn, ast.FunctionDef) and fn.name in METHODS and not is_overload(fn):
                        api.setdefault(node.name, {})[fn.name] = parameters(fn)
    return api


if __name__ == "__main__":
    package, version, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    table = json.loads(out.read_text()) if out.exists() else {}
    table[version] = snapshot(package)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")  # one line a method
