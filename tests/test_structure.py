"""The package's shape, checked from its source: no import circles, the engine core free of torch, the runner
free of the engine, kernels free of layers. Imports inside functions count for circles (they are still a
dependency); imports under `if TYPE_CHECKING:` do not (they never run)."""
from __future__ import annotations

import ast
import pathlib

import slipstream

ROOT = pathlib.Path(slipstream.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _target(name: str) -> str:
    """The module an import runs: the longest prefix of `name` that is one of ours, else the top-level name."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return parts[0]


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """(imports run when the module is imported, all imports that can run)."""
    top: set[str] = set()
    every: set[str] = set()

    def visit(node: ast.AST, at_top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, at_top)
                continue
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module:
                names = [f"{child.module}.{a.name}" for a in child.names]
            for n in names:
                every.add(_target(n))
                if at_top:
                    top.add(_target(n))
            inner = at_top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(ast.parse(path.read_text()), True)
    return top, every


GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def _loaded_by(module: str) -> set[str]:
    """Every module (ours or third-party top-level) that importing `module` runs, parent packages included."""
    seen: set[str] = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        if m in GRAPH:
            stack += GRAPH[m][0]
            parent = m.rpartition(".")[0]
            if parent:
                stack.append(parent)
    return seen


def test_no_import_circles():
    edges = {m: {t for t in GRAPH[m][1] if t in MODULES and t != m} for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    assert not circles, f"import circles: {circles}"


def test_engine_core_imports_no_torch():
    """The scheduler side (engine/) loads without torch: the front end and the core's bookkeeping stay cheap, and
    the runner is the one place that touches tensors."""
    for m in MODULES:
        if m.startswith("slipstream.engine"):
            assert "torch" not in _loaded_by(m), f"importing {m} imports torch"
    for m in ("slipstream.config", "slipstream.runner.batch", "slipstream.server.app", "slipstream.server.protocol"):
        assert "torch" not in _loaded_by(m), f"importing {m} imports torch"


def test_layering():
    for m, (_, every) in GRAPH.items():
        ours = {t for t in every if t.startswith("slipstream.")}
        if m.startswith("slipstream.runner"):
            assert not any(t.startswith("slipstream.engine") for t in ours), f"{m} (runner) imports the engine"
        if m.startswith("slipstream.kernels"):
            assert not any(t.startswith(("slipstream.layers", "slipstream.models", "slipstream.engine")) for t in ours), m
        if m.startswith(("slipstream.engine.scheduler", "slipstream.engine.block_manager", "slipstream.engine.radix_cache")):
            assert "slipstream.runner.model_runner" not in ours, m


def test_the_checker_sees_circles(tmp_path):
    """The parser finds a circle through a function-level import, and skips TYPE_CHECKING ones."""
    a = tmp_path / "a.py"
    a.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import slipstream.config\ndef f():\n    import slipstream.cli\n")
    top, every = _imports(a)
    assert top == {"typing"} and every == {"typing", "slipstream.cli"}


# what a kernel may do before await_inputs(PDL): index arithmetic, and asking L2 for weights no kernel writes
# (k_slice: a one-row GEMV's tile and slice of K, from its program id)
_BEFORE_WAIT = {"tl.program_id", "tl.arange", "prefetch_weights", "k_slice"}


def _pdl_faults(source: str) -> list[str]:
    """Where a kernel module breaks kernels/_pdl.py's rule: a Triton kernel (a `*_kernel` function) that does anything
    but index arithmetic and `prefetch_weights` (after its docstring) before `await_inputs(PDL)`, or a launch
    (`name[grid](...)`) that does not pass `**pdl(...)`. A kernel launched with PDL that touched memory before waiting
    would race the kernel before it."""
    faults = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
            body = node.body[1:] if isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) else node.body
            for stmt in body:
                if isinstance(stmt, ast.Expr) and ast.unparse(stmt.value) == "await_inputs(PDL)":
                    break
                calls = {ast.unparse(c.func) for c in ast.walk(stmt) if isinstance(c, ast.Call)}
                if not isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.Expr)) or not calls <= _BEFORE_WAIT:
                    faults.append(f"{node.name} does not begin with await_inputs(PDL)")
                    break
            else:
                faults.append(f"{node.name} does not begin with await_inputs(PDL)")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            if not any(k.arg is None and isinstance(k.value, ast.Call) and ast.unparse(k.value.func) == "pdl"
                       for k in node.keywords):
                faults.append(f"launch of {ast.unparse(node.func.value)} without **pdl(...)")
    return faults


def test_every_triton_kernel_waits_before_touching_memory():
    # (the Gluon prefill kernel launches without PDL, as kernels did before it: only it may)
    gluon = {"_prefill_sm90_kernel does not begin with await_inputs(PDL)", "launch of _prefill_sm90_kernel without **pdl(...)"}
    faults = {str(p.relative_to(ROOT.parent)): [f for f in _pdl_faults(p.read_text()) if f not in gluon]
              for p in (ROOT / "kernels").glob("*.py")}
    assert {p: f for p, f in faults.items() if f} == {}


def test_the_pdl_checker_sees_a_kernel_that_does_not_wait():
    bad = ("def _a_kernel(x, PDL: tl.constexpr):\n    '''doc'''\n    y = tl.load(x)\n    await_inputs(PDL)\n"
           "def _b_kernel(x, PDL: tl.constexpr):\n    await_inputs(PDL)\n"
           "def f(x):\n    _a_kernel[(1,)](x, **pdl(x))\n    _b_kernel[(1,)](x, PDL=False)\n")
    assert _pdl_faults(bad) == ["_a_kernel does not begin with await_inputs(PDL)", "launch of _b_kernel without **pdl(...)"]
    # index arithmetic and a weight prefetch may come first; a load hidden in a helper's arguments may not
    good = ("def _c_kernel(w, PDL: tl.constexpr):\n    ns = tl.program_id(0) * 8 + tl.arange(0, 8)\n"
            "    prefetch_weights(w, ns, 8, 8, 8, 2, 8, PDL)\n    await_inputs(PDL)\n")
    assert _pdl_faults(good) == []
    assert _pdl_faults(good.replace("prefetch_weights(w,", "prefetch_weights(tl.load(w),")) == [
        "_c_kernel does not begin with await_inputs(PDL)"]
    assert _pdl_faults(good.replace("    await_inputs(PDL)\n", "")) == ["_c_kernel does not begin with await_inputs(PDL)"]
