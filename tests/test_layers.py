"""The layout's rule (docs/design.md, "Module map"): a module imports only its own package or a
lower layer — core < formats < runtime < merging < measure < judge < ship < demo < api < cli —,
nothing imports the CLI, the heavy libraries are imported only where they are needed, inside
functions, and no module reaches itself through its imports. Every import counts, those inside
functions too (they defer a cost; they may not point up).

Read from the source with ``ast``, as written: no module is imported to check it.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "nearswap"
LAYERS = ["core", "formats", "runtime", "merging", "measure", "judge", "ship", "demo", "api", "cli"]
TOP = {"nearswap": "api", "nearswap.api": "api", "nearswap._version": "core", "nearswap._ckernel": "core",
       "nearswap._dequant": "core", "nearswap.__main__": "cli", "nearswap.cli": "cli"}
HEAVY = ("torch", "transformers", "lm_eval", "llama_cpp", "llmcompressor", "exllamav2", "exllamav3", "ray",
         "sentence_transformers", "accelerate", "datasets")
# where a heavy library may be imported (inside a function): the packages that need them, and the
# named exceptions, each for one reason
HEAVY_ALLOWED = ("nearswap.judge", "nearswap.ship", "nearswap.runtime.distributed")
HEAVY_EXCEPTIONS = {
    ("nearswap.core.kernels", "torch"): "nearswap.nearswap() takes torch tensors as well as numpy arrays",
    ("nearswap.formats.gguf", "transformers"): "a GGUF vocabulary type nearswap does not build itself is built by "
                                               "transformers, when it is installed",
}


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer(module: str) -> str:
    if module in TOP:
        return TOP[module]
    return module.split(".")[1] if module.split(".")[1] in LAYERS else "core"


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import of nearswap's own modules and
    of the heavy libraries (``"heavy:NAME"``) in ``path``."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            if root in HEAVY:
                out.append((f"heavy:{root}", node.lineno, id(node) in top_level))
            elif root == "nearswap":
                while name not in known and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name != module:
                    out.append((name, node.lineno, id(node) in top_level))
    return out


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    found = modules()
    known = set(found) | {"nearswap._ckernel", "nearswap._dequant"}
    return {m: imports(m, p, known) for m, p in found.items()}


def violations(edges: dict[str, list[tuple[str, int, bool]]]) -> list[str]:
    bad = []
    for module, targets in sorted(edges.items()):
        here = LAYERS.index(layer(module))
        for target, line, top in targets:
            where = f"{module} (line {line})"
            if target.startswith("heavy:"):
                lib = target.removeprefix("heavy:")
                allowed = module.startswith(HEAVY_ALLOWED) or (module, lib) in HEAVY_EXCEPTIONS
                if not allowed:
                    bad.append(f"{where} imports {lib}, a heavy library, outside {', '.join(HEAVY_ALLOWED)}")
                elif top:
                    bad.append(f"{where} imports {lib} at module level: inside the function that needs it")
                continue
            if layer(target) == "cli" and layer(module) != "cli":
                bad.append(f"{where} imports the CLI ({target})")
            elif LAYERS.index(layer(target)) > here:
                bad.append(f"{where} imports {target}, a higher layer ({layer(target)} above {layer(module)})")
    return bad


def cycles(edges: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    succ = {m: sorted({t for t, _, _ in ts if not t.startswith("heavy:") and t in edges}) for m, ts in edges.items()}
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in succ:
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter[0]
                counter[0] += 1
                stack.append(v)
                on.add(v)
            if i < len(succ[v]):
                work.append((v, i + 1))
                w = succ[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
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
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return out


def test_every_import_points_down_or_sideways_and_no_heavy_library_strays():
    assert violations(graph()) == []


def test_no_module_reaches_itself():
    assert cycles(graph()) == []


def test_the_checks_fail_on_an_upward_import_and_a_cycle():
    """The rule is not vacuous: an import of the judge from the merge layer, one of the CLI, torch at
    module level in the formats, and a cycle between two core modules are each found."""
    edges = graph()
    edges["nearswap.merging.sinks"] = [*edges["nearswap.merging.sinks"], ("nearswap.judge.models", 1, False)]
    edges["nearswap.core.files"] = [*edges["nearswap.core.files"], ("nearswap.cli", 2, False)]
    edges["nearswap.formats.safetensors"] = [*edges["nearswap.formats.safetensors"], ("heavy:torch", 5, True)]
    found = violations(edges)
    assert any("nearswap.merging.sinks (line 1) imports nearswap.judge.models, a higher layer" in v for v in found)
    assert any("nearswap.core.files (line 2) imports the CLI" in v for v in found)
    assert any("nearswap.formats.safetensors (line 5) imports torch" in v for v in found)
    edges = graph()
    edges["nearswap.core.files"] = [*edges["nearswap.core.files"], ("nearswap.core.errors", 3, False)]
    edges["nearswap.core.errors"] = [*edges["nearswap.core.errors"], ("nearswap.core.files", 4, False)]
    assert ["nearswap.core.errors", "nearswap.core.files"] in cycles(edges)


@pytest.mark.parametrize("layer_name", LAYERS[:-2])
def test_each_layer_is_a_package(layer_name):
    assert (SRC / layer_name / "__init__.py").is_file()
