"""The shape of the code: the project's modules import each other one way only, at the top of the file."""
import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
MODULES = {path.stem: path for path in ROOT.glob("*.py")}


def project_imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """(module, node) for every import of a project module anywhere in the tree."""
    found = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        found += [(name.split(".")[0], node) for name in names if name.split(".")[0] in MODULES]
    return found


def graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in project_imports(ast.parse(path.read_text()))} for name, path in MODULES.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules, or None."""
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycle():
    edges = graph()
    assert cycle(edges) is None, cycle(edges)
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]   # the check can fail


def test_no_project_import_inside_a_function():
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        hidden = [f"{name}.py:{node.lineno} imports {m}" for m, node in project_imports(tree) if id(node) not in top]
        assert not hidden, hidden


def test_chat_does_not_pull_in_the_network():
    """A runtime author imports chat (token-exact prompts) without the model, nn or safetensors."""
    edges = graph()
    reach, todo = set(), ["chat"]
    while todo:
        for nxt in edges[todo.pop()] - reach:
            reach.add(nxt)
            todo.append(nxt)
    assert not reach & {"model", "vision", "load"}, reach


def test_the_readme_table_lists_the_modules_in_import_order():
    """The README's module table claims each module imports only modules above it."""
    rows = [line.split("`")[1].removesuffix(".py") for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("| `") and line.split("`")[1].removesuffix(".py") in MODULES]
    assert sorted(rows) == sorted(MODULES), set(MODULES) ^ set(rows)
    edges = graph()
    for k, name in enumerate(rows):
        below = edges[name] - set(rows[:k])
        assert not below, f"{name} imports {below}, listed below it"
