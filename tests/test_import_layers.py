"""usdet's imports run one way: no module imports itself back through others, even from inside a function.

An import placed inside a function to dodge a cycle still makes the two modules depend on each
other; here every import counts, wherever it stands (read with ``ast``, nothing is run), and so
does the package ``__init__`` that Python runs before a submodule. The packages form layers:
the engine trains and runs models and the experiments drive it, so nothing below imports them.
"""
import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "usdet")


def _modules():
    """{dotted name: path} of every module of usdet (a package by its ``__init__``)."""
    out = {}
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), REPO)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def _ancestors(name):
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _imported(module, path, modules):
    """The usdet modules ``module`` imports, anywhere in its file, and the packages run on the way."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rsplit(".", 1)[0]
    names = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if not name:
            continue
        # Python runs each package __init__ on the way to a submodule (not the importer's own packages)
        for target in (_ancestors(name) | {name}) - _ancestors(module) - {module}:
            if target in modules and target != "usdet":
                out.add(target)
    return out


def import_graph():
    modules = _modules()
    return {m: _imported(m, p, modules) for m, p in modules.items()}


def find_cycle(graph):
    """One cycle of ``graph`` as a list of nodes (first = last), or None."""
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_hidden_cycle():
    """The checker itself: a cycle through a function-level import is found, a chain is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    modules = {"usdet.x.report": "", "usdet.x.subgroups": "", "usdet.x": ""}
    src = "def render():\n    from .subgroups import render_subgroups\n"
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"usdet_layer_probe_{os.getpid()}.py")
    with open(path, "w") as fh:
        fh.write(src)
    try:
        assert _imported("usdet.x.report", path, modules) == {"usdet.x.subgroups"}
    finally:
        os.remove(path)


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert len(graph) > 60  # every module was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_packages_form_layers():
    """Package level: no cycle, and nothing below the engine imports the engine or the experiments."""
    graph = import_graph()

    def top(m):
        return ".".join(m.split(".")[:2])

    packages = {}
    for m, targets in graph.items():
        packages.setdefault(top(m), set()).update(top(t) for t in targets if top(t) != top(m))
    low = [p for p in packages if p not in ("usdet.engine", "usdet.experiments")]
    for p in low:
        assert not packages[p] & {"usdet.engine", "usdet.experiments"}, (p, sorted(packages[p]))
    assert "usdet.experiments" not in packages["usdet.engine"]
    # evaluation and visualization draw on each other (reports show overlays, overlays show the
    # evaluation's matches); every other pair of packages is one-way
    merged = {p: {("usdet.evaluation" if t == "usdet.visualization" else t) for t in ts}
              for p, ts in packages.items()}
    merged["usdet.evaluation"] = (merged.pop("usdet.visualization", set()) | merged["usdet.evaluation"]) - {
        "usdet.evaluation"}
    cycle = find_cycle(merged)
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_every_module_imports_in_a_fresh_process():
    """The moved modules import on their own, those that used to sit in a cycle first (before their
    former partners), then every other module of usdet."""
    first = ["usdet.evaluation.subgroups", "usdet.evaluation.operating_point", "usdet.evaluation.compare",
             "usdet.engine.export", "usdet.data.views", "usdet.experiments.crossval", "usdet.experiments.cross_eval"]
    names = first + sorted(set(_modules()) - set(first))
    code = "import importlib\nfor name in %r:\n    importlib.import_module(name)\n" % (names,)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert res.returncode == 0, res.stderr[-2000:]
