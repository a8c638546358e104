"""The streaming runtime's seams: settings passed (never read from the environment at import),
passes that pickle and run in other processes with the same result."""

import ast
import pickle
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import nearswap
from nearswap.formats.safetensors import ShardedWriter
from nearswap.measure import curve
from nearswap.merging import recipe
from nearswap.merging.passes import ChainPass
from nearswap.merging.plan import plan
from nearswap.runtime import stream
from nearswap.runtime.stream import Settings

PACKAGE = Path(nearswap.__file__).parent


def module_level_env_reads(path: Path) -> list[int]:
    """Lines where a module reads os.environ / os.getenv while it is imported: anywhere but
    inside a function body (module and class bodies run at import)."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function = True
        if not in_function and isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
            found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(ast.parse(path.read_text()), False)
    return found


def test_no_module_reads_the_environment_at_import():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20
    reads = {str(p.relative_to(PACKAGE)): lines for p in modules if (lines := module_level_env_reads(p))}
    assert reads == {}
    # the check itself finds what it looks for
    assert module_level_env_reads(Path(__file__).parent / "fixtures_env_at_import.py") == [3, 7]


def test_two_merges_with_different_chunk_sizes_in_one_process_are_identical(make_quartet, tmp_path):
    paths, _ = make_quartet("bf16", n=3, shards=2)
    outputs = []
    for chunk in (37, 1 << 20, 4096):
        out = tmp_path / f"c{chunk}"
        nearswap.merge(paths[0], paths[1:], t=1e-3, out=out, shard_size="2KB", settings=Settings(chunk, 2))
        outputs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors*"))})
    assert len(outputs[0]) > 2 and outputs[0] == outputs[1] == outputs[2]


def _run_items(blob: bytes, items: list[tuple]) -> list:
    """What a worker process does: unpickle the pass, run its items, close what it opened."""
    pass_ = pickle.loads(blob)
    try:
        return [pass_.work(item) for item in items]
    finally:
        if hasattr(pass_, "writer"):
            pass_.writer.close()
        pass_.close()


def test_chain_pass_runs_in_other_processes_to_the_same_bits(make_quartet, tmp_path):
    paths, _ = make_quartet("bf16", n=3, shards=2)
    local = nearswap.merge(paths[0], paths[1:], t=1e-3, out=tmp_path / "local", shard_size="2KB")
    rec = recipe.build({"base": str(paths[0]), "steps": [{"model": str(p), "t": 1e-3} for p in paths[1:]],
                        "shard_size": "2KB"}, "test")
    plan_ = plan(rec)
    out = tmp_path / "remote"
    out.mkdir()
    metadata = {"format": "pt", "nearswap_version": nearswap.__version__,
                "nearswap_recipe": __import__("json").dumps(rec.to_dict())}
    writer = ShardedWriter(out, [(t.name, t.out_dtype, t.shape) for t in plan_.tasks], rec.shard_size, metadata)
    pass_ = ChainPass(plan_, writer)
    blob = pickle.dumps(pass_)
    items = list(pass_.items(Settings(53)))
    halves = [items[0::2], items[1::2]]
    with ProcessPoolExecutor(2, mp_context=get_context("fork")) as pool:
        for results in pool.map(_run_items, [blob, blob], halves):
            for r in results:
                pass_.collect(r)
    writer.close()
    assert [s.to_json()["swapped"] for s in pass_.steps] == [s["swapped"] for s in local["steps"]]
    for f in sorted((tmp_path / "local").glob("*.safetensors")):
        a, b = load_file(str(f)), load_file(str(out / f.name))
        assert a.keys() == b.keys() and all(np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)) for k in a)


def test_count_pass_survives_pickle(make_quartet):
    paths, _ = make_quartet("bf16", n=2, noise=0.002)
    ts = [1e-4, 1e-3]
    want = curve.compute(paths[0], paths[1:], ts, settings=Settings(101))  # (the |d| sample follows the chunks)
    rec = recipe.build({"base": str(paths[0]), "steps": [{"model": str(p), "t": ts[0]} for p in paths[1:]]}, "test")
    plan_ = plan(rec)
    pass_ = pickle.loads(pickle.dumps(curve.CountPass([t for t in plan_.tasks if t.merged], ts, paths[1:])))
    stream.run(pass_, Settings(101))
    got = curve.CurveResult(ts, str(paths[0]), pass_.steps, pass_.histograms())
    assert got.to_json() == want.to_json()


def test_settings_are_checked():
    with pytest.raises(nearswap.NearswapError, match="positive"):
        Settings(0)
    with pytest.raises(nearswap.NearswapError, match="NEARSWAP_CHUNK"):
        Settings.from_env({"NEARSWAP_CHUNK": "many"})
    assert Settings.from_env({"NEARSWAP_CHUNK": "4096"}, 3) == Settings(4096, 3)
    assert Settings.from_env({}) == Settings()


def test_library_calls_leave_process_settings_alone(make_quartet, tmp_path):
    """No process-wide side effects: the garbage collector stays on while a pass runs, the
    pyplot backend and rc settings are what they were after plotting."""

    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a caller's choice, which nearswap's plots must not change
    try:
        _plot_and_merge(matplotlib, make_quartet, tmp_path)
    finally:
        matplotlib.use(before)


def _plot_and_merge(matplotlib, make_quartet, tmp_path):
    import gc

    rc = dict(matplotlib.rcParams)
    paths, _ = make_quartet("bf16", n=1, noise=0.002)
    seen = []
    nearswap.merge(paths[0], paths[1:], t=1e-3, out=tmp_path / "m", progress=lambda n: seen.append(gc.isenabled()))
    assert seen and all(seen)
    result = curve.compute(paths[0], paths[1:], [1e-4, 1e-3])
    written = curve.write_plots(result, tmp_path / "plots")
    assert any(p.suffix == ".png" for p in written) and any(p.suffix == ".svg" for p in written)
    assert matplotlib.get_backend() == "svg" and dict(matplotlib.rcParams) == rc


def test_model_loading_restores_transformers_logging(tiny_llm):
    pytest.importorskip("transformers")
    from transformers.utils import logging as tlog

    from nearswap.judge import models

    tlog.set_verbosity_warning()
    models.load(tiny_llm / "base", threads=1)
    assert tlog.get_verbosity() == tlog.WARNING and tlog.is_progress_bar_enabled()
