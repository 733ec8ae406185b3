"""The layer rules of DESIGN.md, checked on the source: who may import whom, and no import cycles.

A small AST checker reads every import of every module of the installed package (the ``diffalign/`` tree plus
the folders the build maps into it, ``pipelines/`` -> ``diffalign.pipelines`` and so on): module-level and
function-level ``import x`` / ``from x import y``, relative imports resolved, ``importlib.import_module("...")``
/ ``__import__("...")`` with a literal name, and ``"diffalign.x.y:attr"`` strings (the lazy-builder tables of
registries, an import deferred to first use). Lazy imports hide an import from load time, not the dependency,
so all of them count.

Cycles are counted as the project's own tool (``tools/import_cycles.py``) counts them: ``import a.b.c`` is an
edge to the longest prefix that is a module (a package means its ``__init__``); ``from a.b import c`` is an
edge to ``a.b.c`` if that is a module and always one to ``a.b``; a package ``__init__`` importing its own
submodules is not an edge. The string and literal dynamic imports above are edges too (the tool ignores them).

The checks on the real tree are strict (no allow-list); the planted-tree tests show the checker can fail.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
# dotted package -> folder (relative to the repo root), as [tool.setuptools] package-dir in pyproject.toml maps them
ROOTS = {"diffalign": "diffalign", "diffalign.pipelines": "pipelines", "diffalign.eval": "eval", "diffalign.configs": "configs"}
ENTRY_STRING = re.compile(r"^(diffalign(?:\.\w+)*):[A-Za-z_][\w.]*$")  # "diffalign.scorers.hps:HPSv2"


class Import(NamedTuple):
    target: str  # absolute dotted name as written (``from a import b`` gives a.b)
    line: int
    implied: bool = False  # the ``a`` of ``from a import b``: an edge for cycles, not a layer dependency


class Violation(NamedTuple):
    module: str
    line: int
    target: str
    rule: str  # Rule.name


# ------------------------------------------------------------------------------------------------ collecting


def module_files(repo: Path, roots: dict[str, str] = ROOTS) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under each root (``pkg/__init__.py`` is ``pkg``)."""
    found = {}
    for package, folder in roots.items():
        root = repo / folder
        for path in sorted(root.rglob("*.py")):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _package_of(module: str, path: Path) -> str:
    """The package a relative import in this module is relative to."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _absolute(name: str, level: int, module: str, path: Path) -> str | None:
    """``from ..x import`` -> absolute dotted name; None when the dots climb above the top package."""
    if not level:
        return name
    base = _package_of(module, path)
    for _ in range(level - 1):
        if "." not in base:
            return None
        base = base.rpartition(".")[0]
    return f"{base}.{name}" if name else base


def _dynamic_target(node: ast.Call) -> str | None:
    """The literal first argument of ``import_module("x")``, ``importlib.import_module("x")``, ``__import__("x")``."""
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def imports_of(module: str, path: Path) -> list[Import]:
    """Every import this module makes, wherever it sits in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module or "", node.level, module, path)
            if base is None:
                continue
            found += [Import(base if a.name == "*" else f"{base}.{a.name}", node.lineno) for a in node.names]
            found.append(Import(base, node.lineno, implied=True))
        elif isinstance(node, ast.Call) and (name := _dynamic_target(node)):
            level = len(name) - len(name.lstrip("."))
            if (target := _absolute(name.lstrip("."), level, module, path)) is not None:
                found.append(Import(target, node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (m := ENTRY_STRING.match(node.value)):
            found.append(Import(m.group(1), node.lineno))
    return found


def all_imports(modules: dict[str, Path]) -> dict[str, list[Import]]:
    return {m: imports_of(m, path) for m, path in modules.items()}


# ------------------------------------------------------------------------------------------------ layer rules


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _under_any(name: str, *prefixes: str) -> bool:
    return any(_under(name, p) for p in prefixes)


def _objectives_may_import(target: str) -> bool:
    top = target.partition(".")[0]
    return top == "torch" or top in sys.stdlib_module_names or _under(target, "diffalign.objectives")


class Rule(NamedTuple):
    name: str
    text: str
    applies: Callable[[str], bool]  # to the importing module
    forbids: Callable[[str], bool]  # the imported name


RULES = [
    Rule("objectives", "objectives/ import only torch, the standard library and diffalign.objectives",
         lambda m: _under(m, "diffalign.objectives"), lambda t: not _objectives_may_import(t)),
    Rule("scorers", "scorers/ import nothing from diffalign.data or diffalign.trainers",
         lambda m: _under(m, "diffalign.scorers"), lambda t: _under_any(t, "diffalign.data", "diffalign.trainers")),
    Rule("data", "data/ imports nothing from diffalign.trainers",
         lambda m: _under(m, "diffalign.data"), lambda t: _under(t, "diffalign.trainers")),
    Rule("config", "config imports nothing from diffalign.toy, diffalign.scorers or diffalign.trainers",
         lambda m: _under(m, "diffalign.config"),
         lambda t: _under_any(t, "diffalign.toy", "diffalign.scorers", "diffalign.trainers")),
    Rule("pipelines", "pipelines/ import nothing from diffalign.trainers",
         lambda m: _under(m, "diffalign.pipelines"), lambda t: _under(t, "diffalign.trainers")),
    Rule("cli", "the library never imports the CLI (only diffalign.__main__ does)",
         lambda m: m != "diffalign.__main__" and not _under(m, "diffalign.cli"), lambda t: _under(t, "diffalign.cli")),
]  # fmt: skip


def layer_violations(imports: dict[str, list[Import]], rules: list[Rule] = RULES) -> list[Violation]:
    """Each import a rule forbids, once per (module, line, target, rule)."""
    found = {
        Violation(m, imp.line, imp.target, rule.name)
        for m, imps in imports.items()
        for rule in rules
        if rule.applies(m)
        for imp in imps
        if not imp.implied and rule.forbids(imp.target)
    }
    return sorted(found)


# ------------------------------------------------------------------------------------------------ cycles


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (``a.b.Class`` -> ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path], imports: dict[str, list[Import]]) -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}, among our own modules, as tools/import_cycles.py builds it."""
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for m, imps in imports.items():
        is_package = modules[m].name == "__init__.py"
        for imp in sorted(imps, key=lambda i: i.line):
            target = _resolve(imp.target, modules)
            if target is None or target == m or (is_package and target.startswith(m + ".")):
                continue
            graph[m].setdefault(target, imp.line)
    return graph


def _reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected groups of more than one module, each sorted (a module on a cycle reaches itself)."""
    reach = {m: _reachable(graph, m) for m in graph}
    groups = {frozenset({m} | {w for w in reach[m] if m in reach[w]}) for m in graph if m in reach[m]}
    return sorted(sorted(g) for g in groups)


# ------------------------------------------------------------------------------------------------ report


def check(repo: Path, roots: dict[str, str] = ROOTS) -> tuple[list[Violation], list[list[str]], list[str]]:
    """(layer violations, cycles, readable report lines) for the tree at ``repo``."""
    modules = module_files(repo, roots)
    imports = all_imports(modules)
    violations = layer_violations(imports)
    graph = import_graph(modules, imports)
    cycles = import_cycles(graph)

    def where(m: str, line: int) -> str:
        return f"{modules[m].relative_to(repo)}:{line}"

    texts = {rule.name: rule.text for rule in RULES}
    lines = [f"{where(v.module, v.line)}: {v.module} imports {v.target}  [{texts[v.rule]}]" for v in violations]
    for group in cycles:
        lines.append("cycle: " + " <-> ".join(group))
        lines += [f"    {where(a, line)}: {a} -> {b}" for a in group for b, line in graph[a].items() if b in group]
    return violations, cycles, lines


# ------------------------------------------------------------------------------------------------ the real tree


def test_roots_match_the_build_package_dir():
    """ROOTS is the package-dir table of pyproject.toml, so the checker reads the tree the build installs."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("package-dir"))
    assert dict(re.findall(r'"([\w.]+)"\s*=\s*"([\w./-]+)"', line)) == ROOTS


def test_checker_reads_the_real_tree():
    """Guards against a vacuous pass: the modules and imports we know of are found."""
    modules = module_files(REPO)
    for name in ("diffalign", "diffalign.diffusion", "diffalign.objectives.dpo", "diffalign.pipelines", "diffalign.eval.winrate"):
        assert name in modules, name
    imports = imports_of("diffalign.objectives.dpo", modules["diffalign.objectives.dpo"])
    assert any(i.target.partition(".")[0] == "torch" for i in imports)


def test_real_tree_honours_the_layer_rules():
    violations, _, lines = check(REPO)
    assert not violations, "layer rule violations (DESIGN.md, Dependency rules):\n" + "\n".join(lines)


def test_real_tree_has_no_import_cycles():
    _, cycles, lines = check(REPO)
    assert not cycles, "import cycles:\n" + "\n".join(ln for ln in lines if ln.startswith(("cycle", "    ")))


# ------------------------------------------------------------------------------------------------ planted trees


def _plant(root: Path, files: dict[str, str]) -> Path:
    """A fake project: every package folder gets an empty __init__.py unless one is given."""
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    for folder in {p.parent for p in root.rglob("*.py")}:
        (folder / "__init__.py").touch()
    return root


PLANTED = {
    "diffalign/__main__.py": "from diffalign.cli import main\n",  # allowed: the one CLI importer
    "diffalign/cli.py": "def main():\n    pass\n",
    "diffalign/objectives/ok.py": "from __future__ import annotations\nimport math\nimport torch.nn.functional as F\nfrom . import bad\n",
    "diffalign/objectives/bad.py": "import torch\nfrom diffalign.trainers import loop\n",
    "diffalign/scorers/s.py": "def f():\n    from ..data import cache\n    from diffalign.toy import scenes\n",
    "diffalign/config/__init__.py": "from diffalign.config.x import X\n",
    "diffalign/config/x.py": "import importlib\nX = 1\ndef load():\n    return importlib.import_module('diffalign.toy.scenes')\n",
    "diffalign/configs/__init__.py": "import diffalign.scorers.s\n",  # not diffalign.config
    "diffalign/data/cache.py": "REGISTRY = {'a': 'diffalign.trainers.loop:run'}\n",
    "diffalign/trainers/__init__.py": "from diffalign.trainers.loop import run\n",  # __init__ -> own submodule: no edge
    "diffalign/trainers/loop.py": "from diffalign.trainers import helpers\ndef run():\n    import diffalign.cli\n",
    "diffalign/trainers/helpers.py": "",
    "diffalign/toy/scenes.py": "",
    "diffalign/models/a.py": "from diffalign.models import b\n",
    "diffalign/models/b.py": "def f():\n    import diffalign.models.a.thing\n",
    "pipelines/p.py": "from diffalign.eval import e\n",
    "eval/e.py": "from diffalign.pipelines.p import Pipe\n",
}


def test_checker_reports_exactly_the_planted_violations_and_cycles(tmp_path):
    violations, cycles, lines = check(_plant(tmp_path, PLANTED))
    assert set(violations) == {
        Violation("diffalign.objectives.bad", 2, "diffalign.trainers.loop", "objectives"),  # from-import
        Violation("diffalign.scorers.s", 2, "diffalign.data.cache", "scorers"),  # relative, inside a function
        Violation("diffalign.config.x", 4, "diffalign.toy.scenes", "config"),  # importlib.import_module literal
        Violation("diffalign.data.cache", 1, "diffalign.trainers.loop", "data"),  # "module:attr" string
        Violation("diffalign.trainers.loop", 3, "diffalign.cli", "cli"),  # import a.b inside a function
    }, "\n".join(lines)
    assert cycles == [["diffalign.eval.e", "diffalign.pipelines.p"], ["diffalign.models.a", "diffalign.models.b"]]
    assert "    eval/e.py:1: diffalign.eval.e -> diffalign.pipelines.p" in lines


def test_config_as_a_single_module_is_checked_too(tmp_path):
    tree = _plant(tmp_path, {"diffalign/config.py": "from diffalign.scorers import registry\n", "diffalign/scorers/registry.py": ""})
    violations, cycles, _ = check(tree)
    assert [(v.module, v.target) for v in violations] == [("diffalign.config", "diffalign.scorers.registry")]
    assert cycles == []


def test_objectives_third_party_import_and_function_level_cycle(tmp_path):
    """Any non-torch third-party import in objectives is a violation; a cycle closed only inside functions counts."""
    tree = _plant(tmp_path, {
        "diffalign/objectives/o.py": "def f():\n    import numpy\n    from typing import Any\n",
        "diffalign/x.py": "def f():\n    from diffalign import y\n",
        "diffalign/y.py": "def g():\n    from . import x\n",
    })  # fmt: skip
    violations, cycles, _ = check(tree)
    assert [(v.module, v.line, v.target) for v in violations] == [("diffalign.objectives.o", 2, "numpy")]
    assert cycles == [["diffalign.x", "diffalign.y"]]
