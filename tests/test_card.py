"""The model card of a merge (issue 11 item 1): Hub metadata that huggingface_hub's own parser
reads, every input as a base model of a merge, and a license carried from the inputs' own
files — the most restrictive when they disagree, stated; unknown when one says nothing. No
network anywhere in card building."""

import socket

import pytest

import nearswap
from conftest import random_model, write_model
from nearswap.ship import provenance
from nearswap.ship.provenance import Origin, combine

hub = pytest.importorskip("huggingface_hub")


def model_with_card(path, seed, front_matter=None):
    write_model(path, random_model(seed, "f32", scale=0.02), config={"architectures": ["LlamaForCausalLM"]})
    if front_matter is not None:
        (path / "README.md").write_text(f"---\n{front_matter}---\n# a model\n")
    return path


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("card building reached for the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("secondary_license,expect_license,expect_name", [
    ("license: cc-by-nc-4.0\n", "cc-by-nc-4.0", None),
    ("license: other\nlicense_name: noncommercial research use only\n", "other", "noncommercial-research-use-only"),
])
def test_a_restrictive_input_gives_its_license_and_the_disagreement_is_stated(
        tmp_path, no_network, secondary_license, expect_license, expect_name):
    base = model_with_card(tmp_path / "base", 0, "license: apache-2.0\n")
    sec = model_with_card(tmp_path / "sec", 1, secondary_license)
    nearswap.merge(base, [sec], t=1e-3, out=tmp_path / "out")
    card = hub.ModelCard.load(tmp_path / "out" / "README.md")  # huggingface_hub's own parser, a local file
    assert card.data.license == expect_license
    assert card.data.to_dict().get("license_name") == expect_name
    # local folders are no Hub ids: base_model is left out (it linked nowhere), and the card says why
    assert card.data.base_model is None and "base\\_model leaves out base, sec" in card.text
    assert card.data.library_name == "transformers" and {"merge", "nearswap"} <= set(card.data.tags)
    text = card.text
    assert "disagree" in text and "base: apache-2.0" in text and "most restrictive" in text
    assert hub.metadata_load(tmp_path / "out" / "README.md")["license"] == expect_license


def test_inputs_that_agree_and_one_that_says_nothing(tmp_path, no_network):
    base = model_with_card(tmp_path / "base", 0, "license: mit\n")
    same = model_with_card(tmp_path / "same", 1, "license: mit\n")
    silent = model_with_card(tmp_path / "silent", 2)
    nearswap.merge(base, [same], t=1e-3, out=tmp_path / "agree")
    assert hub.ModelCard.load(tmp_path / "agree" / "README.md").data.license == "mit"
    nearswap.merge(base, [same, silent], t=1e-3, out=tmp_path / "unknown")
    card = hub.ModelCard.load(tmp_path / "unknown" / "README.md")
    assert card.data.license == "unknown"  # never silently the base's
    assert "No license is stated by silent" in card.text


def test_a_gguf_inputs_license_and_hub_id(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_license("llama2")
    w.add_repo_url("https://huggingface.co/org-name/Model-7B")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    origin = provenance.origin_of(path)
    assert (origin.id, origin.license, origin.found_in) == ("m.gguf", "llama2", "GGUF general.license")
    assert (origin.hub_id, origin.hub_from) == ("org-name/Model-7B", "GGUF general.repo_url")


def test_a_model_in_the_hub_cache_is_named_by_its_id(tmp_path):
    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc123"
    model_with_card(snap, 0, "license: apache-2.0\n")
    origin = provenance.origin_of(snap)
    assert (origin.hub_id, origin.license) == ("HuggingFaceTB/SmolLM2-135M", "apache-2.0")


def _gguf_of(path, gguf, keys):
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in keys.items():
        w.add_string(key, value)
    w.add_tensor("a.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_base_model_holds_hub_ids_only_parsed_by_huggingface_hub(tmp_path, no_network, run):
    """The card's base_model (new-user issue, item 5): an input in an HF-cache layout by its id,
    a GGUF by its general.base_model.0.repo_url, a plain local folder left out (the card says
    so, `nearswap card` warns); a recipe's base_id / id name any input. huggingface_hub parses
    the result; each input has one name in the card's tables."""
    gguf = pytest.importorskip("gguf")
    cached = model_with_card(tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc", 0,
                             "license: apache-2.0\n")
    local = model_with_card(tmp_path / "mine", 1, "license: apache-2.0\n")
    nearswap.merge(cached, [local], t=1e-3, out=tmp_path / "m")
    card = hub.ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.base_model == ["HuggingFaceTB/SmolLM2-135M"] and card.data.base_model_relation == "merge"
    assert "base\\_model leaves out mine" in card.text and "- abc (HuggingFaceTB/SmolLM2-135M on the Hub)" in card.text
    said = run("card", tmp_path / "m")
    assert said.exit_code == 0 and "warning: base_model leaves out mine" in said.stderr
    # the recipe names the local one
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {cached}\nsteps:\n  - model: {local}\n    t: 1e-3\n    id: me/my-model\n")
    assert run("merge", recipe, "-o", tmp_path / "m2", "-q").exit_code == 0
    card = hub.ModelCard.load(tmp_path / "m2" / "README.md")
    assert card.data.base_model == ["HuggingFaceTB/SmolLM2-135M", "me/my-model"] and "leaves out" not in card.text
    # a GGUF that names its model's repository
    g = _gguf_of(tmp_path / "q.gguf", gguf, {"general.base_model.0.repo_url": "https://huggingface.co/org/Base-1B"})
    origin = provenance.origin_of(g)
    assert (origin.hub_id, origin.hub_from) == ("org/Base-1B", "GGUF general.base_model.0.repo_url")
    assert provenance.origin_of(_gguf_of(tmp_path / "n.gguf", gguf, {})).hub_id is None
    # a bad id in a recipe is one line
    recipe.write_text(f"base: {cached}\nsteps:\n  - model: {local}\n    t: 1e-3\n    id: not an id\n")
    bad = run("merge", recipe, "-o", tmp_path / "m3", "-q")
    assert bad.exit_code == 1 and "step 1.id: expected a Hugging Face Hub id" in bad.stderr


@pytest.mark.parametrize("licenses,expect", [
    (["apache-2.0", "cc-by-sa-4.0"], "cc-by-sa-4.0"),
    (["llama2", "mit"], "llama2"),
    (["cc-by-nc-4.0", "llama2", "apache-2.0"], "cc-by-nc-4.0"),
    (["gemma", "llama3"], "other"),  # both custom, neither contains the other: both apply
])
def test_the_most_restrictive_by_rank(licenses, expect):
    terms = combine([Origin(f"p{i}", f"m{i}", lic) for i, lic in enumerate(licenses)])
    assert terms.license == expect
    ranks = [provenance.rank(lic) for lic in licenses]
    assert provenance.rank(terms.license_name or terms.license) == max(ranks) or terms.license == "other"
    if expect == "other":
        assert terms.license_name == "gemma-and-llama3"


def test_quant_rows_against_ggufs_own_reader(tmp_path, run):
    """nearswap card --quants: each file's type, size and bits per weight (its tensors' bytes
    over their elements, computed here from gguf's reader), and a card that is not nearswap's
    is never overwritten."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from gguf import quants

    base = model_with_card(tmp_path / "base", 0, "license: mit\n")
    nearswap.merge(base, [model_with_card(tmp_path / "sec", 1, "license: mit\n")], t=1e-3, out=tmp_path / "m")
    path = tmp_path / "m.q8_0.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    w.add_tensor("a.weight", quants.quantize(x, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("n.weight", np.ones(256, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(path)
    bpw = 8 * sum(int(t.n_bytes) for t in reader.tensors) / sum(int(t.n_elements) for t in reader.tensors)
    result = run("card", tmp_path / "m", "--quants", path)
    assert result.exit_code == 0, result.output
    card = (tmp_path / "m" / "README.md").read_text()
    assert f"| m.q8\\_0.gguf | Q8\\_0 | {path.stat().st_size / 1e9:.2f} GB | {bpw:.2f} |" in card  # (Markdown-escaped)
    assert hub.ModelCard.load(tmp_path / "m" / "README.md").data.license == "mit"
    (tmp_path / "m" / "README.md").write_text("# my own notes\n")
    refused = run("card", tmp_path / "m")
    assert refused.exit_code == 1 and "not a card nearswap wrote" in refused.stderr
    assert (tmp_path / "m" / "README.md").read_text() == "# my own notes\n"


@pytest.mark.parametrize("option,name", [("--eval", "an eval report"), ("--sweep", "a sweep")])
def test_a_report_of_another_shape_is_one_line(tmp_path, run, option, name):
    base = model_with_card(tmp_path / "base", 0, "license: mit\n")
    nearswap.merge(base, [model_with_card(tmp_path / "sec", 1, "license: mit\n")], t=1e-3, out=tmp_path / "m")
    before = (tmp_path / "m" / "README.md").read_text()
    (tmp_path / "other.json").write_text('{"tasks": [{"x": 1}], "rows": 3}')
    result = run("card", tmp_path / "m", option, tmp_path / "other.json")
    assert result.exit_code == 1 and f"not {name}" in result.stderr and "internal error" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "m" / "README.md").read_text() == before  # the card is left as it was


def test_a_readme_put_there_while_the_card_is_built_is_kept(tmp_path, run, monkeypatch):
    """The check at the start is made again at the swap: a user's README that replaced the
    card meanwhile is swapped back, and nothing of ours is left beside it."""
    from nearswap.ship import card as cards

    base = model_with_card(tmp_path / "base", 0, "license: mit\n")
    nearswap.merge(base, [model_with_card(tmp_path / "sec", 1, "license: mit\n")], t=1e-3, out=tmp_path / "m")
    real = cards.model_card

    def meanwhile(*args, **kwargs):
        (tmp_path / "m" / "README.md").write_text("# a person's notes\n")  # after the first check
        return real(*args, **kwargs)

    monkeypatch.setattr(cards, "model_card", meanwhile)
    result = run("card", tmp_path / "m")
    assert result.exit_code == 1 and "left as it is" in result.stderr
    assert (tmp_path / "m" / "README.md").read_text() == "# a person's notes\n"
    assert not [p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".README")]
