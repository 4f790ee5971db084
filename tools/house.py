"""The shape of the package, measured from its source: import cycles, deferred imports, sizes, public names.

Reads ``apt_salience/**/*.py`` as text (nothing is imported or run) and prints:

* the import graph's cycles: strongly connected groups of modules, counting every import of the package,
  at module level or inside a function (a deferred import hides a cycle from Python, not from the design);
* the imports of the package made inside functions, outside ``apt_salience/cli/`` and
  ``apt_salience/integrations/`` (the layers on top, which may import lazily to start fast);
* the largest modules (lines) and functions (lines of code: docstrings, comments and blank lines left out);
* the number of names in the top-level ``__all__`` and across every module's ``__all__``.

Usage::

    python tools/house.py            # the report
    python tools/house.py --json     # the same as JSON
    python tools/house.py --check    # exit 1 when there is a cycle, a deferred import below cli/integrations,
                                     # a module over 600 lines or a function over 80 lines of code
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Set, Tuple, Union

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "apt_salience"
TOP_LAYERS = ("cli", "integrations")  # may import the package lazily
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from."""
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(current: str, is_package: bool, node: ast.AST, modules: Set[str]) -> List[str]:
    """The package modules an import statement reads (``from . import x`` names module x when it is one)."""
    out: List[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        src = _resolve(current, is_package, node)
        names = [f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src for a in node.names]
    else:
        return out
    for n in names:
        while n and n not in modules:  # import a.b.c -> the deepest known module
            n = n.rpartition(".")[0]
        if n.startswith(PACKAGE) and n:
            out.append(n)
    return out


class _Walker(ast.NodeVisitor):
    def __init__(self, current: str, is_package: bool, modules: Set[str]) -> None:
        self.current, self.is_package, self.modules = current, is_package, modules
        self.depth = 0
        self.type_checking = 0
        self.top: Set[str] = set()
        self.deferred: List[Tuple[int, str]] = []

    def _record(self, node: ast.AST) -> None:
        for t in _targets(self.current, self.is_package, node, self.modules):
            if t == self.current:
                continue
            if self.type_checking:
                continue
            if self.depth:
                self.deferred.append((getattr(node, "lineno", 0), t))
            else:
                self.top.add(t)

    visit_Import = _record
    visit_ImportFrom = _record

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        test = ast.unparse(node.test)
        if test in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            self.type_checking += 1
            for n in node.body:
                self.visit(n)
            self.type_checking -= 1
            for n in node.orelse:
                self.visit(n)
        else:
            self.generic_visit(node)


def _code_lines(fn: FunctionNode, source_lines: List[str]) -> int:
    """Lines of code of a function: its span less blank lines, comment lines and its docstring."""
    start, end = fn.lineno, fn.end_lineno or fn.lineno
    skip: Set[int] = set()
    first = fn.body[0] if fn.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        skip.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    n = 0
    for i in range(start, end + 1):
        text = source_lines[i - 1].strip()
        if i in skip or not text or text.startswith("#"):
            continue
        n += 1
    return n


FunctionNode = Union[ast.FunctionDef, ast.AsyncFunctionDef]


def _functions(tree: ast.AST) -> Iterable[Tuple[str, FunctionNode]]:
    def walk(node: ast.AST, prefix: str) -> Iterable[Tuple[str, FunctionNode]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    return walk(tree, "")


def _all_names(tree: ast.Module) -> List[str]:
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
                try:
                    return [str(x) for x in ast.literal_eval(node.value)]
                except ValueError:
                    return []
    return []


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on: Set[str] = set()
    stack: List[str] = []
    out: List[List[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def measure() -> Dict[str, Any]:
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(f): f for f in files}
    graph: Dict[str, Set[str]] = {}
    deferred: List[str] = []
    sizes: List[Tuple[int, str]] = []
    functions: List[Tuple[int, str]] = []
    all_total = 0
    top_all = 0
    for name, path in modules.items():
        text = path.read_text()
        tree = ast.parse(text)
        w = _Walker(name, path.name == "__init__.py", set(modules))
        w.visit(tree)
        graph[name] = w.top | {t for _, t in w.deferred}
        layer = name.split(".")[1] if name.count(".") >= 1 else ""
        if layer not in TOP_LAYERS:
            deferred += [f"{path.relative_to(ROOT)}:{line} -> {t}" for line, t in w.deferred]
        lines = text.splitlines()
        sizes.append((len(lines), str(path.relative_to(ROOT))))
        for fname, fn in _functions(tree):
            functions.append((_code_lines(fn, lines), f"{path.relative_to(ROOT)}:{fn.lineno} {fname}"))
        names = _all_names(tree)
        all_total += len(names)
        if name == PACKAGE:
            top_all = len(names)
    sizes.sort(reverse=True)
    functions.sort(reverse=True)
    return {
        "cycles": _cycles(graph),
        "deferred_imports": deferred,
        "largest_modules": [{"lines": n, "file": f} for n, f in sizes[:5]],
        "largest_functions": [{"lines_of_code": n, "function": f} for n, f in functions[:5]],
        "modules_over_limit": [f for n, f in sizes if n > MAX_MODULE_LINES],
        "functions_over_limit": [f for n, f in functions if n > MAX_FUNCTION_LINES],
        "names_in_top_level_all": top_all,
        "names_in_all_modules_all": all_total,
    }


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 when a rule of the house is broken")
    args = ap.parse_args(argv)
    r = measure()
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        cycles = r["cycles"]
        print(f"import cycles: {len(cycles)}")
        for c in cycles:
            print(f"  {len(c)} modules: {', '.join(c)}")
        deferred = r["deferred_imports"]
        print(f"imports of the package inside functions (below cli/ and integrations/): {len(deferred)}")
        for d in deferred:
            print(f"  {d}")
        print("largest modules: " + ", ".join(f"{m['file']} {m['lines']}" for m in r["largest_modules"]))
        print("largest functions (lines of code): "
              + ", ".join(f"{m['function']} {m['lines_of_code']}" for m in r["largest_functions"]))
        print(f"modules over {MAX_MODULE_LINES} lines: {len(r['modules_over_limit'])}; "
              f"functions over {MAX_FUNCTION_LINES} lines of code: {len(r['functions_over_limit'])}")
        print(f"names in __all__: {r['names_in_top_level_all']} at the top level, "
              f"{r['names_in_all_modules_all']} across all modules")
    if args.check:
        broken = bool(r["cycles"] or r["deferred_imports"] or r["modules_over_limit"] or r["functions_over_limit"])
        return 1 if broken else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
