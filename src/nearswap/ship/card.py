"""The model card written into every merged checkpoint: what was merged, how, and what it did.

Only facts nearswap knows: inputs, the recipe, the measured per-step counts, the tool. No
claims about quality — that is what `nearswap sweep` and the user's own evaluations are for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._version import __version__
from ..core.markup import fence, md
from ..merging.report import rules_note
from .provenance import Origin, Terms, combine, origin_of


def merge(recipe: Any, out: str | Path, gguf_type: str | None = None, **run: Any) -> dict[str, Any]:
    """A merge as it is published: ``merging.sinks.merge`` with this card written into a
    directory output before the output is put in place. Returns the report."""
    from ..merging import sinks

    def write_card(tmp: Path, report: dict[str, Any], recipe_yaml: str) -> None:
        inputs = [recipe.base, *(step.model for step in recipe.steps)]
        (tmp / "README.md").write_text(model_card({**report, "output_name": Path(out).name}, recipe_yaml, inputs,
                                                  hub_ids=hub_ids_of(recipe)))

    return sinks.merge(recipe, out, gguf_type, card=write_card, **run)


def front_matter(origins: list[Origin], terms: Terms) -> str:
    """The card's YAML metadata as the Hugging Face Hub reads it: every input as a base model
    of a merge, the library, the license, the tags."""
    import yaml

    known = [o.hub_id for o in origins if o.hub_id]
    data: dict[str, Any] = {"base_model": known, "base_model_relation": "merge"} if known else {}
    data.update({"library_name": "transformers", "license": terms.license})
    if terms.license_name:
        data["license_name"] = terms.license_name
    data["tags"] = ["merge", "nearswap"]
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "---\n"


def hub_ids_of(recipe: Any) -> list[str | None]:
    """The Hub id the recipe gives each input (``base_id``, each step's ``id``), None where none."""
    return [recipe.base_id, *(step.id for step in recipe.steps)]


def unknown_hub_ids(origins: list[Origin]) -> str:
    """The sentence a card says of the inputs whose Hub id nothing states (left out of its
    ``base_model``), or ""."""
    missing = [o.id for o in origins if not o.hub_id]
    if not missing:
        return ""
    return (f"base_model leaves out {', '.join(missing)}: no Hugging Face Hub id is known for "
            f"{'it' if len(missing) == 1 else 'them'} (none in the recipe, the config's _name_or_path, a GGUF's "
            "general.repo_url / general.source.* / general.base_model.0.repo_url, or a Hugging Face cache path); "
            "give one as base_id (the base) or id (a step) in the recipe")


def model_card(report: dict[str, Any], recipe_yaml: str, inputs: list[str | Path], *,
               evaluation: dict[str, Any] | None = None, sweep: dict[str, Any] | None = None,
               quants: list[dict[str, Any]] | None = None, hub_ids: list[str | None] | None = None,
               origins: list[Origin] | None = None) -> str:
    """The card of a merge from its report and recipe; ``inputs``: the base and secondaries'
    paths (their own files give their names and licenses). With ``evaluation`` (an eval
    report.json), ``sweep`` (a sweep.json) and ``quants`` (``quant_row`` of each file), their
    tables too. ``origins``: the inputs' ``origin_of``, where the caller has them already."""
    steps = report["steps"]
    if origins is None:
        origins = [origin_of(path, hub) for path, hub in zip(inputs, hub_ids or [None] * len(inputs))]
    terms = combine(origins)
    licenses = "\n".join(f"- {md(o.id)}{' (' + md(o.hub_id) + ' on the Hub)' if o.hub_id else ''}: "
                          f"{md(o.license) if o.license else 'not stated'}"
                          + (f" (from its {md(o.found_in)})" if o.found_in else "") for o in origins)
    missing = unknown_hub_ids(origins)
    rows = "\n".join(
        f"| {i} | {md(Path(s['model']).name)} | {s['t']:g}{md(rules_note(s).replace('  (', ' ('))} | "
        f"{100 * s['swapped'] / s['total']:.2f}% | "
        f"{100 * s['moved'] / s['total']:.2f}% | {100 * s['identical'] / s['total']:.2f}% | "
        f"{100 * s.get('changed', 0) / s['total']:.2f}% | {s['mean_abs_change']:.3g} |"
        for i, s in enumerate(steps, 1)
    )
    net = report.get("all_steps")
    if net and len(steps) > 1 and net["total"]:
        rows += (f"\n| all | (the merge against its base) | | | | | {100 * net['changed'] / net['total']:.2f}% | |")
    rounding = ("kept in float32 between steps (carry_float32)" if report.get("carry_float32")
                else "rounded to the output dtype after each step")
    held = "kept in float32 between steps" if report.get("carry_float32") else "stored in the output dtype"
    return front_matter(origins, terms) + f"""# {md(Path(report['output_name']).name)}

A sequential NearSwap merge of {md(Path(report['base']).name)} with {len(steps)} secondary model(s), made
with nearswap {__version__} ({md(report.get('kernel', '?'))} kernel).

NearSwap keeps the base model's weights, except where a secondary's weight is within `t` of
the running result: there it moves to the secondary — fully when |difference| <= t, by t
otherwise (`w = clip(nan_to_num(t / |v0 - v1|, 1), 0, 1); v = (1 - w) v0 + w v1`, in float32,
{rounding}).

## What each step did (measured while merging, exact counts)

| step | secondary | t | fully swapped | moved by t | identical | changed | mean abs change |
|---|---|---|---|---|---|---|---|
{rows}

"Fully swapped", "moved by t" and "identical" are the formula's cases (|difference| <= t, > t,
= 0); "changed" counts the weights whose value, as {held}, the step actually changed: a move
smaller than the output dtype's resolution rounds away, and a tensor merged at t = 0 changes
nothing. The "all" row counts the weights of this checkpoint that differ from the base's as
the output dtype stores them (a weight moved by one step and back by another is not
counted). Per-tensor counts are in `merge_report.json`.

{_extra_sections(evaluation, sweep, quants)}## Recipe

{fence(recipe_yaml.strip(), "yaml")}

## License

{licenses}

{md(terms.note) if terms.note else ""}

## Notes

{_quality_note(evaluation, sweep, quants)}
{"- " + md(missing) + "." + chr(10) if missing else ""}- NearSwap is the algorithm of the QuartetAnemoi-70B model card (alchemonaut); this merge was made with nearswap.
"""


def _quality_note(evaluation: dict[str, Any] | None, sweep: dict[str, Any] | None,
                  quants: list[dict[str, Any]] | None = None) -> str:
    if evaluation is None and sweep is None and not any("eval" in q for q in quants or []):
        return "- Quality was not evaluated by the tool that wrote this card; `nearswap eval` and `nearswap sweep` judge a merge."
    return ("- Quality: the sections above are what nearswap measured; no other claim about quality is made here. "
            "Benchmarks on a sample of items are a check, not a leaderboard score.")


def _extra_sections(evaluation: dict[str, Any] | None, sweep: dict[str, Any] | None,
                    quants: list[dict[str, Any]] | None) -> str:
    out = []
    if evaluation is not None:
        from ..judge.report import benchmark_table

        limit = evaluation.get("settings", {}).get("limit")
        lines = ["## Evaluation (nearswap eval)", ""]
        if evaluation.get("tasks"):
            lines += [*benchmark_table(evaluation), "",
                      f"Scores in % as lm-evaluation-harness computes them (± standard error), on "
                      f"{'the first ' + str(limit) + ' items of each task' if limit else 'every item'}; a difference is "
                      "*better* or *worse* only when its whole 95% paired interval is on one side of zero.", ""]
        for d in evaluation.get("drift", [])[1:]:
            lines.append(f"- Drift of {md(d['model'])} from {md(evaluation['drift'][0]['model'])}: KL {d['kl_mean']:.3g} nats "
                         f"per token, top-1 agreement {100 * d['top1_agreement']:.2f}%, perplexity {d['perplexity']:.3f} "
                         f"(reference {evaluation['drift'][0]['perplexity']:.3f}).")
        out.append("\n".join(lines) + "\n")
    if sweep is not None:
        from ..judge.sweep import markdown as sweep_table

        secondaries = sweep.get("secondaries") or []
        what = (f"The sweep merged {md(Path(str(sweep.get('base'))).name)} with {len(secondaries)} secondar"
                f"{'y' if len(secondaries) == 1 else 'ies'} ({', '.join(md(Path(str(x)).name) for x in secondaries)}) at "
                f"each t, the same t for every step{sweep.get('relation', '')}")
        out.append(f"## The t-sweep (nearswap sweep)\n\n{what}; each row a merge at that t, judged against the base "
                   "(verdict rules in nearswap's docs/judging.md):\n\n" + sweep_table(sweep) + "\n")
    if quants:
        out.append(_quant_section(quants))
    return "\n".join(out) + ("\n" if out else "")


def _quant_section(quants: list[dict[str, Any]]) -> str:
    """The card's quant table; with an eval of the quants (``attach_quant_eval``) each file's
    drift from the eval's float reference and its task scores against the model it was paired
    with (the base's same quant), as that report measured them."""
    from ..judge.report import paired_cell

    measured = [q["eval"] for q in quants if "eval" in q]
    if not measured:
        rows = "\n".join(f"| {md(q['file'])} | {md(q['type'])} | {q['bytes'] / 1e9:.2f} GB | {q['bpw']:.2f} |" for q in quants)
        return "## Quantized files\n\n| file | type | size | bits per weight |\n|---|---|---:|---:|\n" + rows + "\n"
    ref = md(measured[0]["reference"])
    lines = [f"| file | type | size | bits per weight | KL to {ref} | top-1 | tasks against | difference |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for q in quants:
        e = q.get("eval")
        cells = (["—"] * 4 if e is None else
                 ["—" if e["kl_mean"] is None else f"{e['kl_mean']:.4g}",
                  "—" if e["top1_agreement"] is None else f"{100 * e['top1_agreement']:.2f}%", md(e["against"]),
                  paired_cell(e["difference"])])
        lines.append(f"| {md(q['file'])} | {md(q['type'])} | {q['bytes'] / 1e9:.2f} GB | {q['bpw']:.2f} | " + " | ".join(cells) + " |")
    what = measured[0]["what"]
    return ("## Quantized files\n\n" + "\n".join(lines) + "\n\n"
            f"From `nearswap eval` ({what}): KL (nats per token) and top-1 agreement of each file's next-token "
            f"distributions with {ref}'s on nearswap's fixed text; the difference is the file's task scores minus "
            "those of the model in *tasks against* on the same items, in percentage points with the 95% paired "
            "interval and its word.\n")


def attach_quant_eval(where: Path, evaluation: dict[str, Any], files: list[Path], rows: list[dict[str, Any]]) -> None:
    """Put an eval report's quant table (``nearswap eval FLOAT QUANT... --against ...``) beside
    the card's rows of the same files: a row takes the figures of the evaluated model that is
    that file (``formats.identity``: its path, size and modification time), nothing else."""
    from ..core.errors import NearswapError, shown
    from ..formats.identity import identity

    quants, models = evaluation.get("quants"), evaluation.get("models")
    if not isinstance(quants, list) or not quants or not isinstance(models, list):
        raise NearswapError(f"{where} has no quant table: give the report of nearswap eval FLOAT QUANT... "
                            "--against BASE_QUANT... (docs/judging.md)")
    try:
        names = {m["identity"]: m["name"] for m in models}
        by_model = {q["model"]: q for q in quants}
        reference = models[0]["name"]
        tasks = [t["name"] for t in evaluation["tasks"]]
    except (KeyError, TypeError, IndexError):
        raise NearswapError(f"{where}: not an eval report that nearswap wrote (its quant table cannot be read)") from None
    matched = 0
    for path, row in zip(files, rows):
        q = by_model.get(names.get(identity(path), ""))
        if q is None:
            continue
        difference = q["average"] if q.get("average") else q["tasks"][0]
        row["eval"] = {"reference": reference, "against": q["against"], "kl_mean": q.get("kl_mean"),
                       "top1_agreement": q.get("top1_agreement"), "difference": difference,
                       "what": f"{', '.join(tasks)}; " + ("the average over tasks" if q.get("average") else "one task")}
        matched += 1
    if not matched:
        named = ", ".join(shown(q.get("model"), 40) for q in quants[:3])
        raise NearswapError(f"{where} evaluates none of the --quants files (it has {named}): give the report of "
                            "nearswap eval on these files")


def quant_row(path: str | Path) -> dict[str, Any]:
    """A GGUF file's row of the card's quant table: its name, type (``general.file_type``), size
    on disk, and bits per weight (the tensors' bytes over their elements)."""
    from ..formats.gguf_header import HeaderError, file_type_name, read_header

    path = Path(path)
    try:
        header = read_header(path)
    except (HeaderError, OSError) as e:
        from ..core.errors import NearswapError

        raise NearswapError(f"{path}: not a readable GGUF file ({e}); --quants takes GGUF files") from None
    elements = sum(t.n_elements for t in header.tensors)
    bits = 8 * sum(t.n_bytes for t in header.tensors)
    return {"file": path.name, "type": file_type_name(header), "bytes": path.stat().st_size, "bpw": bits / elements if elements else 0.0}


def rebuild(directory: str | Path, evaluation: str | Path | None = None, sweep: str | Path | None = None,
            quants: list[str | Path] = (), quant_eval: str | Path | None = None) -> Path:
    """Write a merge's card again (``nearswap card``): from its ``merge_report.json`` and
    ``nearswap_recipe.yaml``, with the tables of an eval report, a sweep and quantized files.
    The card is replaced atomically; a README.md nearswap did not write is refused."""
    from ..core.errors import NearswapError
    from ..core.files import read_bytes, read_json_object
    from ..merging.layout import RECIPE_NAME, REPORT_NAME
    from ..merging.recipe import load
    from .provenance import front_matter

    directory = Path(directory)
    for name in (REPORT_NAME, RECIPE_NAME):
        if not (directory / name).is_file():
            raise NearswapError(f"{directory} has no {name}: nearswap card rebuilds the card of a nearswap merge")
    card = directory / "README.md"
    if card.exists() and "nearswap" not in (front_matter(card).get("tags") or []):
        raise NearswapError(f"{card} is not a card nearswap wrote; move it away to have nearswap write one")
    report = read_json_object(directory / REPORT_NAME, "merge report")
    recipe_yaml = read_bytes(directory / RECIPE_NAME, 1 << 20, "recipe").decode("utf-8", "replace")
    rec = load(directory / RECIPE_NAME)  # its paths are relative to the directory: the inputs, wherever we run

    def report_of(path: str | Path | None, name: str) -> dict[str, Any] | None:
        if path is None:
            return None
        path = Path(path)
        return read_json_object(path / name if path.is_dir() else path, name)

    extras = {"evaluation": report_of(evaluation, "report.json"), "sweep": report_of(sweep, "sweep.json")}
    inputs = [rec.base, *(step.model for step in rec.steps)]
    if isinstance(extras["sweep"], dict):
        extras["sweep"]["relation"] = _sweep_relation(extras["sweep"], inputs)
    if extras["evaluation"] is not None:
        _check_evaluated(Path(evaluation), extras["evaluation"], directory, inputs)
    for key, path, what in (("evaluation", evaluation, "an eval report (report.json)"),
                            ("sweep", sweep, "a sweep (sweep.json)")):
        if extras[key] is not None:  # its tables, alone: a file of another shape is one line, not a traceback
            try:
                _extra_sections(**{k: (v if k == key else None) for k, v in extras.items()}, quants=None)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError):
                raise NearswapError(f"{path}: not {what} that nearswap wrote (its tables cannot be read); "
                                    "give the directory nearswap eval / sweep wrote") from None
    quant_rows = [quant_row(q) for q in quants]
    if quant_eval is not None:
        if not quants:
            raise NearswapError("--quant-eval gives the figures of --quants files: name the files too")
        attach_quant_eval(Path(quant_eval), report_of(quant_eval, "report.json") or {}, [Path(q) for q in quants], quant_rows)
    origins = [origin_of(p, h) for p, h in zip(inputs, hub_ids_of(rec))]
    text = model_card({**report, "output_name": directory.name}, recipe_yaml, inputs, **extras,
                      quants=quant_rows, origins=origins)
    missing = unknown_hub_ids(origins)
    if missing:
        import warnings

        from ..core.errors import NearswapWarning

        warnings.warn(missing, NearswapWarning, stacklevel=2)
    _replace_card(card, text)
    return card


def _sweep_relation(sweep: dict[str, Any], inputs: list[str]) -> str:
    """What a sweep measured, next to the merge whose card shows it: the same inputs (nothing to
    say), the first steps of its chain, or other models — said in the card, so that a table of
    another merge is never read as this one's. Inputs are compared by identity
    (``formats.identity``), recorded by the sweep."""
    from ..formats.identity import identity

    recorded = sweep.get("identities")
    if not isinstance(recorded, list) or not all(isinstance(x, str) for x in recorded):
        return ("; the sweep did not record its inputs' identities (an older nearswap sweep), so this card cannot "
                "say whether they are this merge's")
    ours = [identity(p) for p in inputs]
    steps = len(ours) - 1
    if recorded == ours:
        return " (this merge's base and secondaries)"
    if len(recorded) < len(ours) and recorded == ours[: len(recorded)]:
        n = len(recorded) - 1
        return (f"; **only the first {n} of this merge's {steps} steps** (its base and first secondar"
                f"{'y' if n == 1 else 'ies'}): the table does not measure the whole chain")
    return ("; **other models than this merge's base and secondaries**: the table does not describe this merge "
            "and is shown only as given")


def _check_evaluated(where: Path, evaluation: dict[str, Any], directory: Path, inputs: list[str]) -> None:
    """An eval report goes into a merge's card only if it evaluated that merge, and nothing but
    the merge and its inputs (``provenance.identity``: the merge by its recorded checksums)."""
    from ..core.errors import NearswapError, shown
    from ..formats.identity import identity

    models = evaluation.get("models")
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("identity"), str) for m in models):
        raise NearswapError(f"{where}: its models carry no identity (an older nearswap eval, or not an eval report): "
                            f"run nearswap eval on {directory} and its inputs again")
    merge = identity(directory)
    allowed = {merge, *(identity(p) for p in inputs)}
    stranger = [m for m in models if m["identity"] not in allowed]
    if stranger or merge not in {m["identity"] for m in models}:
        named = ", ".join(shown(m.get("name"), 40) for m in (stranger or models)[:3])
        raise NearswapError(f"{where} evaluates {'models that are not this merge or its inputs' if stranger else 'other models than this merge'}"
                            f" ({named}); its table would describe other models: give the report of "
                            f"nearswap eval on {directory} and its base")


def _replace_card(card: Path, text: str) -> None:
    """Put ``text`` at ``card`` in one step: a new card is renamed into place only if nothing
    is there by then; an old one is swapped out and checked again afterwards, so a README a
    person put there meanwhile is swapped back, never removed."""
    import os
    import tempfile

    from ..core.errors import NearswapError
    from ..runtime.output import exchange, rename_noreplace
    from .provenance import front_matter

    fd, name = tempfile.mkstemp(prefix=".README.md.", suffix=".nearswap-part", dir=card.parent)  # our own, O_EXCL
    part = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if not os.path.lexists(card):
            rename_noreplace(part, card)
            return
        exchange(part, card)  # part now holds what was at the card's path a moment ago
        if not part.is_file() or part.is_symlink() or "nearswap" not in (front_matter(part).get("tags") or []):
            exchange(part, card)
            raise NearswapError(f"{card} was replaced by a file nearswap did not write while the card was built; "
                                "it is left as it is")
    except FileExistsError:
        raise NearswapError(f"{card} appeared while the card was built; it is left as it is") from None
    finally:
        if part.is_file() and not part.is_symlink():
            part.unlink()  # ours: the new text, or the old nearswap card
