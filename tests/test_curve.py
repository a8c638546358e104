"""nearswap curve: exact swap counts at any t, per step, kind and layer; the plotted curve."""

import json
from pathlib import Path

import numpy as np
import pytest

from nearswap.measure import curve
from nearswap.runtime.stream import Settings
from reference import counts as ref_counts
from reference import nearswap_step

TS = [0.0, 1e-4, 5e-4, 1e-3, 2.5e-3, 1e-2]


def expected_step_counts(arrays, ts):
    """Per step, per t, per tensor: (swapped, identical) from the reference chain at that t."""
    base, secs = arrays[0], arrays[1:]
    out = {}
    for t in ts:
        for name, b in base.items():
            r = b.astype(np.float32)
            for k, s in enumerate(secs):
                c = ref_counts(t, r, s[name].astype(np.float32))
                out[(k, t, name)] = (c["swapped"], c["identical"], c["total"])
                r = nearswap_step(t, r, s[name].astype(np.float32)).astype(b.dtype).astype(np.float32)
    return out


@pytest.fixture(params=["c", "numpy"])
def backend(request, monkeypatch):
    """The C kernel, and the numpy fallback a build without a compiler gets."""
    from nearswap.core import kernels

    if request.param == "numpy":
        monkeypatch.setattr(kernels, "_ckernel", None)
    elif kernels._ckernel is None:
        pytest.skip("no C kernel in this build")
    return request.param


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("n", [1, 3])
def test_counts_are_exact(make_quartet, dtype, n, backend):
    paths, arrays = make_quartet(dtype, n=n, noise=0.002)
    result = curve.compute(paths[0], paths[1:], TS)
    want = expected_step_counts(arrays, sorted(TS))
    for k, step in enumerate(result.steps):
        for name, c in step.tensors.items():
            for j, t in enumerate(result.ts):
                swapped, identical, total = want[(k, t, name)]
                assert (int(c.swapped[j]), c.total) == (swapped, total), (k, t, name)
                if j == 0:
                    assert c.identical == identical


def test_counts_exact_with_tiny_chunks(make_quartet, monkeypatch):
    paths, arrays = make_quartet("bf16", n=1, noise=0.002)
    result = curve.compute(paths[0], paths[1:], TS, settings=Settings(29))
    want = expected_step_counts(arrays, sorted(TS))
    for name, c in result.steps[0].tensors.items():
        assert [int(x) for x in c.swapped] == [want[(0, t, name)][0] for t in result.ts]


def test_kinds_and_layers_partition_the_total(make_quartet):
    paths, _ = make_quartet("bf16", n=1, noise=0.002)
    result = curve.compute(paths[0], paths[1:], TS)
    data = result.to_json()
    step = data["steps"][0]
    assert sum(k["total"] for k in step["by_kind"].values()) == step["total"]
    for t in map(repr, result.ts):
        assert sum(k["swapped"][t] for k in step["by_kind"].values()) == step["swapped"][t]
    assert set(step["by_kind"]) == {"attn_q", "mlp_up", "embed", "norm", "head"}
    assert list(step["by_layer"]) == ["0"] and set(step["by_layer"]["0"]) == {"attn_q", "mlp_up", "norm"}
    assert curve.kind_of("model.layers.3.self_attn.k_proj.weight") == "attn_k"
    assert curve.kind_of("lm_head.weight") == "head" and curve.kind_of("foo.bias") == "other"


def test_plotted_curve_agrees_with_the_exact_points(make_quartet):
    """The curve is a sample (every 8th element); at its own bin edges it is exact for that sample."""
    paths, arrays = make_quartet("f32", n=1, noise=0.002)
    result = curve.compute(paths[0], paths[1:], TS)
    d = np.concatenate([np.abs(arrays[0][n].astype(np.float32) - arrays[1][n].astype(np.float32)).ravel()
                        for n in result.steps[0].tensors])
    sample = np.concatenate([np.abs(arrays[0][n].astype(np.float32) - arrays[1][n].astype(np.float32)).ravel()[::8]
                             for n in result.steps[0].tensors])
    keep = result.plotted
    share = result.curve_share(result.hist_all)[keep]
    for edge, got in list(zip(result.edges[keep], share))[::7]:
        assert got == pytest.approx(np.mean((sample > 2.0 ** -40) & (sample < edge)))
    # and the sample tracks the exact shares, within 5 binomial standard errors
    totals = result.steps[0].totals
    for t, n in zip(result.ts[1:], totals.swapped[1:]):
        p = n / d.size
        assert abs(np.mean((sample > 0) & (sample <= t)) - p) <= 5 * np.sqrt(p * (1 - p) / sample.size) + 1e-12


def test_cli_table_json_and_plots(make_quartet, tmp_path, run):
    paths, _ = make_quartet("bf16", n=2, noise=0.002)
    out = run("curve", *paths, "--t", "1e-4,1e-3,1e-2", "--plot", tmp_path / "plots", "-q")
    assert out.exit_code == 0, out.output
    assert "step 1" in out.stdout and "step 2" in out.stdout and "by tensor kind" in out.stdout
    for name in ("curve.png", "curve.svg", "heatmap.png", "heatmap.svg"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" if name.endswith("png") else b"<svg" in data
    js = json.loads(run("curve", *paths, "--t", "1e-3", "--json").stdout)
    assert js["ts"] == [1e-3] and len(js["steps"]) == 2 and len(js["curve"]["share"]) > 10
    assert js["curve"]["share"] == sorted(js["curve"]["share"])


@pytest.mark.parametrize("ts, needle, code", [("abc", "comma-separated lists", 2), ("-1e-4", "t must be", 1),
                                             ("nan", "t must be", 1)])
def test_cli_bad_t(make_quartet, run, ts, needle, code):
    """Not a number: a usage error (2, as for any malformed option); out of range: 1."""
    paths, _ = make_quartet(n=1)
    result = run("curve", *paths, "--t", ts)
    assert result.exit_code == code and needle in result.stderr and "Traceback" not in result.output


def test_counting_needs_no_numpy(make_quartet, tmp_path):
    """The table path of `curve` starts fast: numpy loads only for --json and --plot."""
    import subprocess
    import sys

    paths, _ = make_quartet("bf16", n=2, noise=0.002)
    code = ("import sys; from nearswap.measure import curve; "
            f"r = curve.compute({str(paths[0])!r}, {[str(p) for p in paths[1:]]!r}); curve.format_table(r); "
            "print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_too_many_ts_is_one_clear_error(make_quartet, run):
    paths, _ = make_quartet(n=1)
    result = run("curve", *paths, "--t", ",".join(f"{k}e-4" for k in range(1, 70)))
    assert result.exit_code == 1 and "1 to 64 values of t" in result.stderr


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_no_page_of_the_inputs_stays_mapped(tmp_path, monkeypatch):
    """The curve maps its inputs and drops each chunk's pages once counted; what is still
    mapped when it finishes would be resident memory that grows with the model."""
    from conftest import random_model, write_model
    from nearswap.formats import safetensors

    shapes = {"model.layers.0.mlp.up_proj.weight": (1024, 1000), "model.layers.0.mlp.down_proj.weight": (1000, 1024),
              "model.norm.weight": (1000,)}
    base = random_model(0, "f32", shapes=shapes)
    paths = [write_model(tmp_path / "base", base), write_model(tmp_path / "s1", random_model(1, "f32", shapes=shapes, like=base))]
    left: dict[str, int] = {}
    close = safetensors.MappedReader.close

    def close_and_look(self):
        mapping = None
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
                mapping = line.split()[-1] if len(line.split()) >= 6 else None
            elif line.startswith("Rss:") and mapping and mapping.startswith(str(tmp_path)):  # this test's inputs
                left[mapping] = left.get(mapping, 0) + int(line.split()[1])
        close(self)

    monkeypatch.setattr(safetensors.MappedReader, "close", close_and_look)
    result = curve.compute(paths[0], paths[1:], [1e-3], settings=Settings(100_003))  # chunk edges fall mid-page
    assert result.steps[0].totals.total == sum(a.size for a in base.values())
    assert len(left) == 2 and all(kb == 0 for kb in left.values()), left


def test_plot_directory_is_never_clobbered_silently(make_quartet, tmp_path, run):
    """--plot DIR appears whole; an existing DIR (or a file there) is refused before the pass, --force replaces it."""
    paths, _ = make_quartet(n=1)
    (tmp_path / "afile").write_text("keep me")
    result = run("curve", *paths, "--plot", tmp_path / "afile", "-q")
    assert result.exit_code == 1 and "already exists" in result.stderr and "Traceback" not in result.output
    assert (tmp_path / "afile").read_text() == "keep me"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("mine")
    result = run("curve", *paths, "--plot", docs, "--force", "-q")  # not an earlier plot: never replaced
    assert result.exit_code == 1 and "does not look like nearswap's output" in result.stderr
    assert (docs / "notes.txt").read_text() == "mine" and "step 1" not in result.stdout  # refused before counting
    plots = tmp_path / "plots"
    assert run("curve", *paths, "--plot", plots, "-q").exit_code == 0
    (plots / "notes.txt").write_text("mine")
    result = run("curve", *paths, "--plot", plots, "-q")
    assert result.exit_code == 1 and "--force" in result.stderr and (plots / "notes.txt").exists()
    assert "step 1" not in result.stdout  # refused before counting, not after
    result = run("curve", *paths, "--plot", plots, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in plots.iterdir()) == ["curve.json", "curve.png", "curve.svg", "heatmap.png", "heatmap.svg"]
    assert json.loads((plots / "curve.json").read_text())["ts"] == [float(t) for t in "1e-4,3e-4,1e-3,2.5e-3,5e-3,1e-2".split(",")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial left behind


def test_files_that_cannot_be_mapped_are_read(make_quartet, monkeypatch):
    """Some file systems refuse mmap: the curve reads those files instead, with the same counts."""
    from nearswap.formats import safetensors

    paths, arrays = make_quartet("bf16", n=1, noise=0.002)
    mapped = curve.compute(paths[0], paths[1:], TS).to_json()

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")

    monkeypatch.setattr(safetensors.mmap, "mmap", refuse)
    read = curve.compute(paths[0], paths[1:], TS).to_json()
    assert read["steps"] == mapped["steps"] and read["curve"] == mapped["curve"]


def test_chain_counts_exact_across_blocks(make_quartet, monkeypatch):
    """Later steps are simulated block by block (all t per block): blocks that split chunks and
    tensors at odd places still sum to the reference chain's counts."""
    monkeypatch.setattr(curve, "CHAIN_BLOCK", 37)
    paths, arrays = make_quartet("bf16", n=3, noise=0.002)
    result = curve.compute(paths[0], paths[1:], TS, settings=Settings(101))
    want = expected_step_counts(arrays, sorted(TS))
    for k, step in enumerate(result.steps):
        for name, c in step.tensors.items():
            got = [int(x) for x in c.swapped]
            assert got == [want[(k, t, name)][0] for t in result.ts], (k, name)
            assert c.total == want[(k, result.ts[0], name)][2]


# ---------------------------------------------------------------- --sample


@pytest.mark.parametrize("sizes,fraction", [([10, 70_000, 1 << 20, 3 * (1 << 16) + 5], 0.25), ([1 << 22] * 3, 0.01),
                                            ([5] * 400, 0.1)])
def test_sample_items_are_a_systematic_sample_of_blocks(sizes, fraction):
    """Blocks numbered through the model; every stride-th read, the same for every model of
    these sizes; a tensor's last block may be short."""
    block = curve.SAMPLE_BLOCK
    stride = round(1 / fraction)
    numbered = [(i, b) for i, size in enumerate(sizes) for b in range(-(-size // block))]
    want = [numbered[k] for k in range(stride // 2, len(numbered), stride)]
    items = list(curve.sample_items(sizes, fraction))
    assert [(i, start // block) for i, start, _ in items] == want
    assert all(n == min(block, sizes[i] - start) and start % block == 0 for i, start, n in items)
    assert list(curve.sample_items(sizes, 1.0)) == [(i, b * block, min(block, sizes[i] - b * block)) for i, b in numbered]


@pytest.fixture(scope="module")
def sampled_trio(tmp_path_factory):
    from nearswap.demo import synthetic

    root = tmp_path_factory.mktemp("sampled")
    synthetic.make_base(root / "base", synthetic.LlamaShape(512, 4, 1376, 8192, 8, 4), "bfloat16", seed=0)
    secs = [synthetic.make_secondary(root / "base", root / f"s{i}", 0.0125, seed=i) for i in (1, 2)]
    return [root / "base", *secs]


def test_a_sampled_curve_is_within_three_standard_errors_of_the_exact_one(sampled_trio):
    """Every share of a 10% sample, both steps of a chain, every t, against the exact curve;
    and a tenth of the bytes read."""
    exact = curve.compute(sampled_trio[0], sampled_trio[1:])
    sampled = curve.compute(sampled_trio[0], sampled_trio[1:], sample=0.1)
    s = sampled.sample
    assert s.blocks >= 20 and s.of == exact.steps[0].totals.total
    assert 0.05 < s.elements / s.of < 0.2 and s.bytes_read < 0.15 * 3 * 2 * s.of  # three bf16 inputs
    for k, (e, got) in enumerate(zip(exact.steps, sampled.steps)):
        e, got = e.totals, got.totals
        for j in range(len(exact.ts)):
            exact_share, estimate = e.swapped[j] / e.total, got.swapped[j] / got.total
            assert s.stderr[k][j] > 0
            assert abs(estimate - exact_share) <= 3 * s.stderr[k][j], (k, exact.ts[j], estimate, exact_share)


def test_a_sample_asks_the_disk_for_every_block_it_reads_before_reading(sampled_trio, monkeypatch):
    """The scattered blocks are hinted all at once (so they queue at the disk together): the
    hinted byte ranges are exactly the ranges read, and every hint comes before the first read."""
    from nearswap.formats import safetensors as st

    events = []
    will_need, pread = st.FileReader.will_need, st.pread_exact
    monkeypatch.setattr(st.FileReader, "will_need", lambda self, info, start, n: (
        events.append(("hint", str(info.file), info.offset + start * info.dtype.itemsize, n * info.dtype.itemsize)),
        will_need(self, info, start, n)))
    monkeypatch.setattr(st, "pread_exact", lambda fd, view, pos, info: (
        events.append(("read", str(info.file), pos, len(view))), pread(fd, view, pos, info)))
    curve.compute(sampled_trio[0], sampled_trio[1:], sample=0.1)
    hints = [e[1:] for e in events if e[0] == "hint"]
    reads = [e[1:] for e in events if e[0] == "read"]
    assert len(reads) >= 60 and sorted(hints) == sorted(reads)  # three inputs, 20+ blocks each
    assert max(i for i, e in enumerate(events) if e[0] == "hint") < min(i for i, e in enumerate(events) if e[0] == "read")


def test_cli_sample_says_it_is_an_estimate(sampled_trio, run):
    result = run("curve", sampled_trio[0], sampled_trio[1], "--sample", "0.1")
    assert result.exit_code == 0, result.output
    assert "estimated from a systematic sample" in result.stdout and "±" in result.stdout
    data = json.loads(run("curve", sampled_trio[0], sampled_trio[1], "--sample", "0.1", "--json").stdout)
    assert data["sample"]["fraction"] == 0.1 and len(data["sample"]["stderr"]) == 1
    bad = run("curve", sampled_trio[0], sampled_trio[1], "--sample", "0")
    assert bad.exit_code == 2 and "--sample" in bad.stderr


def test_inputs_larger_than_memory_are_sampled_by_default_and_say_so(sampled_trio, run, monkeypatch):
    """The command's default: exact while the inputs fit in memory; past it a 1% sample, said on
    stderr and in the JSON; --exact counts every element anyway."""
    from nearswap.formats import open_model

    pair = sampled_trio[:2]
    reads = sum(open_model(p).nbytes for p in pair)
    monkeypatch.setattr(curve, "memory_bytes", lambda: reads)  # exactly fits: exact
    assert "sample" not in json.loads(run("curve", *pair, "--json").stdout)
    monkeypatch.setattr(curve, "memory_bytes", lambda: reads - 1)
    result = run("curve", *pair)
    assert result.exit_code == 0 and f"the inputs ({reads / 1e9:.1f} GB) are more than this machine's memory" in result.stderr
    assert "estimated from a systematic sample" in result.stdout
    data = json.loads(run("curve", *pair, "--json").stdout)
    assert data["sample"]["fraction"] == curve.AUTO_SAMPLE and "--exact reads every element" in data["sample"]["why"]
    exact = run("curve", *pair, "--exact")
    assert exact.exit_code == 0 and exact.stderr == "" and ", exact:" in exact.stdout
    both = run("curve", *pair, "--exact", "--sample", "0.1")
    assert both.exit_code == 2 and "exclude each other" in both.stderr
