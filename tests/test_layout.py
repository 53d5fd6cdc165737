"""The package's layers: imports run one way (csa <- pipelines <- story/video <- world <- app), and no two modules
outside the CSA core import each other. Read from the source (type-checking imports aside)."""

import ast
import itertools
from pathlib import Path

import storydiffusion

PACKAGE = Path(storydiffusion.__file__).parent
# lower imports nothing higher; modules of one rank but different layers do not import each other
RANKS = {"base": 0, "csa": 1, "pipelines": 2, "story": 3, "video": 3, "clip_score": 3, "world": 4, "app": 5}
BASE = {"errors", "files"}  # plain helpers every layer may use


class _Imports(ast.NodeVisitor):
    """The storydiffusion modules a source file imports at run time (not under `if TYPE_CHECKING`)."""

    def __init__(self) -> None:
        self.found: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" not in ast.unparse(node.test):
            self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and node.module.startswith("storydiffusion.") and node.level == 0:
            self.found.add(node.module)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.update(a.name for a in node.names if a.name.startswith("storydiffusion."))


def module_imports() -> dict[str, set[str]]:
    """Module name -> the storydiffusion modules it imports at run time (anywhere in it)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
        found[name] = visitor.found
    return found


def layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the package's own __init__: it re-exports, lazily
    return "base" if parts[1] in BASE else parts[1]


def test_imports_run_one_way():
    wrong = []
    for module, imports in module_imports().items():
        for target in imports:
            mine, theirs = layer(module), layer(target)
            if mine is None or theirs is None or mine == theirs:
                continue
            if RANKS[theirs] >= RANKS[mine]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layers: " + "; ".join(sorted(wrong))


def test_no_two_modules_outside_the_csa_core_import_each_other():
    graph = module_imports()
    pairs = [
        (a, b)
        for a, b in itertools.combinations(sorted(graph), 2)
        if b in graph[a] and a in graph[b] and not (layer(a) == layer(b) == "csa")
    ]
    assert not pairs, f"modules importing each other: {pairs}"
