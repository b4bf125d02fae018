"""The package's layers (docs/architecture.md), checked on its imports: every `noble_cli` import, at module level or
inside a function (not those under TYPE_CHECKING), goes to the same layer or one below, and no modules import each
other in a cycle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "noble_cli"

# Lowest first. A module's layer is its longest matching prefix.
LAYERS = [
    ("errors", "atomic", "seeding", "parsing", "console", "roles"),
    ("layers",),
    ("config",),
    ("models", "data"),
    ("tasks",),
    ("recipes",),
    ("train", "sweep", "report", "bench", "data.cli", "layers_cli", "sample", "trackers"),
    ("cli", "entry", "__main__", "sweep.__main__"),
]
# Known exceptions, each with its reason.
ALLOWED = {
    # A VQGAN checkpoint is read back into its task module to encode images into codes (the data of the image-token
    # task): the data module rebuilds the model through the registry.
    ("data.image_tokens", "tasks"), ("data.image_tokens", "recipes"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    best = max(((len(p), i) for i, group in enumerate(LAYERS) for p in group
                if name == p or name.startswith(p + ".")), default=None)
    assert best is not None, f"noble_cli.{name} is in no layer of docs/architecture.md"
    return best[1]


def imports(path: Path, modules: set[str]) -> set[str]:
    """The noble_cli modules `path` imports (relative to the package), TYPE_CHECKING blocks left out."""
    found: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.update(f"{node.module}.{a.name}" for a in node.names)
            found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    out = set()
    for name in found:
        if name.startswith("noble_cli."):
            short = name.removeprefix("noble_cli.")
            while short and short not in modules:
                short = short.rpartition(".")[0]
            if short:
                out.add(short)
    return out


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imports(path, modules) - {name} for name, path in paths.items()}


def test_imports_go_down_the_layers():
    wrong = []
    for name, deps in graph().items():
        for dep in deps:
            if layer(dep) > layer(name) and not any(name == a and (dep == b or dep.startswith(b + "."))
                                                    for a, b in ALLOWED):
                wrong.append(f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    g = graph()
    cycles, state = [], {}

    def walk(node, stack):
        state[node] = "open"
        for dep in sorted(g[node]):
            if dep.startswith(node + ".") or node.startswith(dep + "."):  # a package and its own modules
                continue
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                walk(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            walk(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
