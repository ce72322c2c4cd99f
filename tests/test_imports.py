"""The dependency rule, checked statically on the source tree.

    wan_animate (library)  <-  data_tools, train, eval

* ``wan_animate`` imports none of ``train``, ``eval``, ``data_tools``;
* ``eval`` never imports ``train``;
* ``train`` and ``eval`` import no ``data_tools`` *command* module (what they need lives in
  ``wan_animate`` or in a library module such as ``data_tools.pose`` / ``data_tools.driving``);
* no ``sys.path`` edits inside the packages;
* no import cycles inside ``wan_animate`` (function-level imports count: a cycle hidden in a
  function is still a cycle).

Every import statement counts, also those inside functions. The checker runs on a synthetic bad
tree too (negative control), so a checker that finds nothing cannot pass unnoticed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wan_animate", "data_tools", "train", "eval")
COMMAND_MODULES = ("data_tools.prepare", "data_tools.preprocess_driving", "data_tools.inspect",
                   "data_tools.cache_latents", "data_tools.synthetic")
FORBIDDEN = {  # importer package -> imported prefixes it must not use
    "wan_animate": ("train", "eval", "data_tools"),
    "eval": ("train", *COMMAND_MODULES),
    "train": ("eval", *COMMAND_MODULES),
}


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """Absolute module names imported anywhere in ``path`` (``from a import b`` -> ``a.b`` when
    that is a module of the tree, else ``a``), with line numbers."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
    return found


def _sys_path_edits(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value  # sys.path.insert(...), sys.path.append(...)
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            target = next((t for t in targets if isinstance(t, (ast.Attribute, ast.Subscript))), None)
            target = target.value if isinstance(target, ast.Subscript) else target
        if (isinstance(target, ast.Attribute) and target.attr == "path" and isinstance(target.value, ast.Name)
                and target.value.id == "sys"):
            lines.append(node.lineno)
    return lines


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import), via Tarjan."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check_tree(root: Path) -> list[str]:
    """Every violation of the dependency rule under ``root``, one line each."""
    known = _modules(root)
    problems, graph = [], {}
    for name, path in known.items():
        pkg = name.split(".")[0]
        rel = path.relative_to(root)
        for line in _sys_path_edits(path):
            problems.append(f"{rel}:{line}: edits sys.path (install the project, or run with python -m)")
        for imported, line in _imports(name, path, known):
            for bad in FORBIDDEN.get(pkg, ()):
                if imported == bad or imported.startswith(bad + "."):
                    problems.append(f"{rel}:{line}: {pkg} imports {imported} (forbidden: {pkg} -> {bad})")
            if pkg == "wan_animate" and imported.startswith("wan_animate") and imported in known and imported != name:
                graph.setdefault(name, set()).add(imported)
    for comp in _cycles(graph):
        problems.append(f"import cycle inside wan_animate: {' <-> '.join(comp)}")
    return problems


def test_the_tree_follows_the_dependency_rule():
    problems = check_tree(ROOT)
    assert not problems, "dependency rule broken (docs/ARCHITECTURE.md):\n" + "\n".join(problems)


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    files = {
        "wan_animate/__init__.py": "",
        "wan_animate/a.py": "from wan_animate import b\n",
        "wan_animate/b.py": "def f():\n    from wan_animate.a import x\n",  # a cycle hidden in a function
        "wan_animate/c.py": "import train.loop\n",
        "wan_animate/ok.py": "from wan_animate import c\n",
        "eval/__init__.py": "",
        "eval/m.py": "from train import loop\nfrom data_tools.prepare import ResizePlan\n",
        "eval/fine.py": "from data_tools.pose.format import PoseSequence\nfrom wan_animate import ok\n",
        "train/__init__.py": "",
        "train/loop.py": "import sys\nsys.path.insert(0, '..')\nfrom data_tools import synthetic\n",
        "data_tools/__init__.py": "",
        "data_tools/prepare.py": "from wan_animate import ok\n",
        "data_tools/synthetic.py": "",
        "data_tools/pose/__init__.py": "",
        "data_tools/pose/format.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    problems = "\n".join(check_tree(tmp_path))
    assert "wan_animate/c.py:1: wan_animate imports train.loop" in problems
    assert "eval/m.py:1: eval imports train" in problems
    assert "eval/m.py:2: eval imports data_tools.prepare" in problems
    assert "train/loop.py:2: edits sys.path" in problems
    assert "train/loop.py:3: train imports data_tools.synthetic" in problems
    assert "import cycle inside wan_animate: wan_animate.a <-> wan_animate.b" in problems
    assert "eval/fine.py" not in problems and "data_tools/prepare.py" not in problems
    assert problems.count("\n") + 1 == 6, problems  # nothing else
