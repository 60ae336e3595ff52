"""The shape of ``helpers/``: packages by concept, no import cycle between its modules (imports inside functions
included: a lazy import only hides a cycle), no module a reader cannot hold in their head."""
import ast
from pathlib import Path

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
MAX_LINES = 600
PACKAGES = ("tinysql", "models", "patching", "circuits", "experiments")


def _module_name(path: Path) -> str:
    parts = path.relative_to(HELPERS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in HELPERS.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the helpers modules it imports (``from helpers.x import y`` counts y when y is a module)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                raise AssertionError(f"{path}: relative import; helpers imports by absolute path")
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_helpers():
    graph = import_graph()
    assert len(graph) > 30 and graph["helpers.patching.sweep"]  # the graph was read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_module_over_the_size_limit():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_packages_by_concept():
    """Every module lives in one of the concept packages; only the shared parameter reading sits beside them."""
    top = {p.name for p in HELPERS.iterdir() if p.suffix == ".py"}
    assert top == {"__init__.py", "parameter_values.py"}
    for package in PACKAGES:
        assert (HELPERS / package / "__init__.py").is_file()


def test_lower_packages_never_import_higher_ones():
    """tinysql (the task) <- models <- patching <- experiments: each package imports only the ones before it."""
    rank = {p: i for i, p in enumerate(PACKAGES)}
    for name, edges in import_graph().items():
        package = name.split(".")[1] if name.count(".") else None
        if package not in rank:
            continue
        for target in edges:
            other = target.split(".")[1] if target.count(".") else None
            if other in rank:
                assert rank[other] <= rank[package], f"{name} imports {target}"
