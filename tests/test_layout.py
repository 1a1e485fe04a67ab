"""The package's layering (docs/design/layout.md): every module of python/trp has the floor of its subpackage,
and its imports of trp modules run only to its own floor or below, at module level, without cycles and without
another module's private (underscore) names."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "python" / "trp"

# Lowest first. A module's floor is its first subpackage's (trp.core.rank: "core"); the package's own
# __init__ and __main__ sit above everything (they gather the public names).
FLOORS = {"_utils": 0, "core": 1, "nn": 2, "models": 2, "cost": 3, "prune": 4, "deploy": 5, "app": 6,
          "integrations": 6}
TOP = max(FLOORS.values()) + 1


def module_name(path, root=ROOT):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["trp", *parts])


def floor(module):
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return TOP
    if parts[1] not in FLOORS:
        raise AssertionError(f"{module}: not in a known subpackage ({', '.join(FLOORS)}): give it a floor")
    return FLOORS[parts[1]]


def _absolute(node, module, is_package):
    """The absolute module name an ImportFrom reads from (relative imports resolved)."""
    if node.level == 0:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_trp(name):
    return name == "trp" or name.startswith("trp.")


def _local_scopes(tree):
    """The import nodes inside a function (at any depth)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    inside.add(id(sub))
    return inside


def analyse(sources, packages=()):
    """(edges, problems) of a set of modules. sources: {module name: source text}; packages: the names of
    those that are packages (their __init__). edges: {module: {trp modules it imports at module level}};
    problems: one line each for a function-local import of a trp module, an upward import and an import of
    another module's private name. Cycles are found by cycles(edges)."""
    modules = set(sources)
    edges, problems = {m: set() for m in sources}, []
    for module, text in sources.items():
        tree = ast.parse(text)
        local = _local_scopes(tree)
        aliases = {}  # name bound in this module -> the trp module it is
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(a.name, a.asname or a.name.split(".")[0], a.name if a.asname else a.name.split(".")[0])
                           for a in node.names if _is_trp(a.name)]
                found = [t for t, _, _ in targets]
                for _, bound, what in targets:
                    aliases[bound] = what
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(node, module, module in packages)
                if not _is_trp(source):
                    continue
                found = []
                for a in node.names:
                    sub = f"{source}.{a.name}"
                    if sub in modules:  # `from trp.core import rank`: the submodule
                        found.append(sub)
                        aliases[a.asname or a.name] = sub
                    else:
                        found.append(source)
                        if a.name.startswith("_"):
                            problems.append(f"{module}:{node.lineno}: imports the private name {a.name} of {source}")
            else:
                continue
            for target in found:
                if id(node) in local:
                    problems.append(f"{module}:{node.lineno}: function-local import of {target}")
                    continue
                if target == module:
                    continue
                edges[module].add(target)
                if floor(target) > floor(module):
                    problems.append(f"{module}:{node.lineno}: imports {target}, a higher floor "
                                    f"({floor(target)} > {floor(module)})")
        for node in ast.walk(tree):  # alias._private: another module's private name
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and aliases[node.value.id] != module:
                problems.append(f"{module}:{node.lineno}: uses the private name {node.attr} of "
                                f"{aliases[node.value.id]}")
    return edges, problems


def cycles(edges):
    """The import cycles of a graph, each as a list of modules (empty: none)."""
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def package_sources():
    files = sorted(ROOT.rglob("*.py"))
    sources = {module_name(p): p.read_text() for p in files}
    packages = {module_name(p) for p in files if p.name == "__init__.py"}
    return sources, packages


def test_every_module_has_a_floor():
    for module in package_sources()[0]:
        floor(module)


def test_imports_run_downward_at_module_level_without_private_names():
    edges, problems = analyse(*package_sources())
    assert problems == []
    assert cycles(edges) == []


def test_no_module_of_the_top_level_but_the_package_entry_points():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"]


def test_each_subpackage_says_what_lives_there():
    for name in FLOORS:
        init = ROOT / name / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init}: no docstring"


@pytest.mark.parametrize("sources, expected", [
    ({"trp.core.a": "from trp.core import b\n", "trp.core.b": "from trp.core.a import f\n"}, "cycle"),
    ({"trp.core.a": "from trp.deploy import io\n", "trp.deploy.io": ""}, "a higher floor"),
    ({"trp.deploy.a": "def f():\n    from trp.core import b\n", "trp.core.b": ""}, "function-local"),
    ({"trp.deploy.a": "from trp.core.b import _hidden\n", "trp.core.b": ""}, "private name _hidden"),
    ({"trp.deploy.a": "from trp.core import b\nb._hidden()\n", "trp.core.b": ""}, "private name _hidden"),
    ({"trp.app.a": "from ..core import b\n", "trp.core.b": "import trp.app.a\n"}, "a higher floor"),
])
def test_the_checker_finds_each_kind_of_violation(sources, expected):
    edges, problems = analyse(sources)
    found = problems + [" -> ".join(c) + " (cycle)" for c in cycles(edges)]
    assert any(expected in p for p in found), found


def test_the_checker_passes_a_clean_graph():
    sources = {"trp.core.a": "import torch\nfrom trp._utils import c\nc.check()\n", "trp._utils.c": "",
               "trp.app.x": "def f():\n    import onnx  # optional\n    return onnx\nfrom trp.core import a\n"}
    edges, problems = analyse(sources)
    assert problems == [] and cycles(edges) == []
    assert edges["trp.app.x"] == {"trp.core.a"}
