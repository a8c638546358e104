"""The model card written into every merged checkpoint: what was merged, how, and what it did.

Only facts nearswap knows: inputs, the recipe, the measured per-step counts, the tool. No
claims about quality — that is what `nearswap sweep` and the user's own evaluations are for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._version import __version__
from .provenance import Origin, Terms, combine, origin_of
from .stats import rules_note


def front_matter(origins: list[Origin], terms: Terms) -> str:
    """The card's YAML metadata as the Hugging Face Hub reads it: every input as a base model
    of a merge, the library, the license, the tags."""
    import yaml

    data: dict[str, Any] = {"base_model": [o.id for o in origins], "base_model_relation": "merge",
                            "library_name": "transformers", "license": terms.license}
    if terms.license_name:
        data["license_name"] = terms.license_name
    data["tags"] = ["merge", "nearswap"]
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "---\n"


def model_card(report: dict[str, Any], recipe_yaml: str) -> str:
    steps = report["steps"]
    origins = [origin_of(report["base"]), *(origin_of(s["model"]) for s in steps)]
    terms = combine(origins)
    licenses = "\n".join(f"- `{o.id}`: {o.license or 'not stated'}"
                          + (f" (from its {o.found_in})" if o.found_in else "") for o in origins)
    rows = "\n".join(
        f"| {i} | `{Path(s['model']).name}` | {s['t']:g}{rules_note(s).replace('  (', ' (')} | "
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
    return front_matter(origins, terms) + f"""# {Path(report['output_name']).name}

A sequential NearSwap merge of `{Path(report['base']).name}` with {len(steps)} secondary model(s), made
with nearswap {__version__} ({report.get('kernel', '?')} kernel).

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

## Recipe

```yaml
{recipe_yaml.strip()}
```

## License

{licenses}

{terms.note}

## Notes

- Quality was not evaluated by the tool that wrote this card; `nearswap eval` and `nearswap sweep` judge a merge.
- NearSwap is the algorithm of the QuartetAnemoi-70B model card (alchemonaut); this merge was made with nearswap.
"""
