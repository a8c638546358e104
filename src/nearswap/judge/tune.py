"""`nearswap tune`: the largest t the base tolerates, found by the judge in a few merges.

The share of weights a step swaps is monotone in t, and so, for the secondaries NearSwap is
made for, is the drift of the merge from the base. So the edge of a drift budget (``kl<=0.01``:
the merge's mean KL divergence from the base on the drift text at most 0.01 nats per token) is
found by bisection on the share axis, not by a grid of merges far from it:

- each step's |d| (against the running result, as the merge computes it) is counted once by
  the high 16 bits of its float32 pattern (``measure.swapshare.DistancePass``): from those
  counts, any share maps to the t that swaps it, to 1/128 of t;
- a candidate is merged at that t (the steps before at their chosen t) and its drift measured
  (one forward pass of the merge over the drift text, against the base's distributions, which
  are computed once): the merge that swaps everything (the secondary itself) first, then
  halves of the share interval, at most ``max_merges`` merges a step;
- a chain is tuned step by step against the running result: step k's t is the largest that
  keeps the chain after step k within the budget, steps 1..k-1 at their chosen t, as the card
  merged its secondaries one after the other.

Every measured candidate is appended to ``trials.jsonl`` in the output folder as soon as it is
measured (written and synced), keyed by the inputs' identities, the t of every step and the
drift text: a killed tune, run again, takes what was measured and merges only the rest. The
output: ``tune.json`` (the budget, every candidate with its t, share and drift, the choice),
``tune.md``, ``frontier.png`` and ``recipe.yaml`` (re-runnable by ``nearswap merge``); the
caller (``api.tune``) merges it with its card into ``merged/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..core.errors import InvalidValue, NearswapError, shown

TRIALS = "trials.jsonl"
MAX_MERGES = 6  # a step: the secondary itself, then five halvings of the share interval (1/32 of it)
# METRIC in --budget METRIC<=X or METRIC>=X: the drift figure it bounds, and the direction a merge moves it
METRICS = {"kl": ("kl_mean", "<="), "kl_p99": ("kl_p99", "<="), "top1": ("top1_agreement", ">=")}
FILES = ("tune.json", "tune.md", "frontier.png", "recipe.yaml")
KIND_MERGES = 3  # --per-kind: merges per group of tensors, at most
# --per-kind: groups of tensors, each a recipe rule (first match wins: norms first, q_norm/k_norm are norms)
GROUPS = (("norms", ("*norm*",)), ("attention", ("*.self_attn.*",)), ("mlp", ("*.mlp.*",)),
          ("embeddings", ("*embed_tokens*", "lm_head*")))


@dataclass(frozen=True)
class Budget:
    """The drift a merge may have: ``key`` (a figure of ``drift.compare``) ``op`` ``bound``."""

    name: str
    key: str
    op: str
    bound: float

    def holds(self, drift: dict[str, Any]) -> bool:
        value = float(drift[self.key])
        return value <= self.bound if self.op == "<=" else value >= self.bound

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.bound:g}"


def parse_budget(text: str) -> Budget:
    """``kl<=0.01``, ``kl_p99<=0.2``, ``top1>=0.95``; anything else, or a bound no merge but
    the base can meet or none can, is refused in one line."""
    names = ", ".join(f"{name}{op}X" for name, (_, op) in METRICS.items())
    m = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*(<=|>=|<|>|=)\s*(\S+)\s*", str(text))
    if not m:
        raise InvalidValue(f"--budget {shown(text)}: write METRIC<=X or METRIC>=X ({names})")
    name, op, raw = m.group(1).lower(), m.group(2), m.group(3)
    if name not in METRICS:
        raise InvalidValue(f"--budget {shown(text)}: unknown metric {shown(name)}; the budgets are {names}")
    key, direction = METRICS[name]
    try:
        bound = float(raw)
    except ValueError:
        raise InvalidValue(f"--budget {shown(text)}: {shown(raw)} is not a number") from None
    if not math.isfinite(bound):
        raise InvalidValue(f"--budget {shown(text)}: the bound must be a finite number")
    if op != direction:
        raise InvalidValue(f"--budget {shown(text)}: {name} is bounded {'above' if direction == '<=' else 'below'} "
                           f"(a merge moves it {'up' if direction == '<=' else 'down'} from the base's); write "
                           f"{name}{direction}X")
    if bound < 0:
        raise InvalidValue(f"--budget {shown(text)}: {name} is never negative; give a bound above 0")
    if name == "top1" and bound > 1:
        raise InvalidValue(f"--budget {shown(text)}: top-1 agreement is a share, at most 1 (the base's own); "
                           "no merge can meet it")
    if (direction == "<=" and bound == 0) or (name == "top1" and bound == 1):
        raise InvalidValue(f"--budget {shown(text)}: only the base itself meets it (t = 0): nothing to tune; "
                           f"give {'a bound above 0' if direction == '<=' else 'a share below 1'}")
    return Budget(name, key, op, bound)


@dataclass
class Axis:
    """One step's |d| counted by the high 16 bits of its float32 pattern: share <-> t."""

    cum: Any  # cumulative counts per pattern (numpy int64 [65536])
    total: int  # merged elements

    def t_at(self, share: float) -> float:
        """The smallest bucket edge at which at least ``share`` of the merged elements swap."""
        import numpy as np

        if self.cum[-1] == 0:
            return 0.0
        wanted = min(max(1, math.ceil(share * self.total)), int(self.cum[-1]))
        high = int(np.searchsorted(self.cum, wanted))
        return float(struct.unpack("<f", struct.pack("<I", (high << 16) | 0xFFFF))[0])

    def share_at(self, t: float) -> float:
        """The share that swaps at a bucket edge ``t`` (exact there: every |d| of a bucket is at
        most its edge)."""
        if t <= 0:
            return 0.0
        high = struct.unpack("<I", struct.pack("<f", t))[0] >> 16
        return int(self.cum[min(high, len(self.cum) - 1)]) / self.total


def axis(plan_: Any, step: int, ts_before: list[float], threads: int | None) -> Axis:
    import numpy as np

    from ..measure.swapshare import HIGH, DistancePass
    from ..runtime import stream
    from ..runtime.stream import Settings

    counting = DistancePass(plan_.tasks, step, ts_before, plan_.recipe.carry_float32)
    stream.run(counting, Settings(threads=threads))
    counts = counting.counts if counting.counts is not None else np.zeros(HIGH, np.int64)
    return Axis(np.cumsum(counts), sum(t.numel for t in plan_.tasks if t.merged))


class Trials:
    """Measured candidates, appended to ``path`` one JSON line each and synced; lines that do
    not parse (a torn write) or were measured for other inputs are not taken."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        self.rows: dict[str, dict[str, Any]] = {}
        if path.is_file():
            from ..core.files import read_bytes

            for line in read_bytes(path, 64 << 20, "tune trials").decode("utf-8", "replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and row.get("key") == key and isinstance(row.get("ts"), list):
                    self.rows[self._id(row["ts"], row.get("rules") or [])] = row

    @staticmethod
    def _id(ts: Sequence[float], rules: Sequence[Any] = ()) -> str:
        return ",".join(repr(float(t)) for t in ts) + json.dumps(list(rules), sort_keys=True)

    def get(self, ts: Sequence[float], rules: Sequence[Any] = ()) -> dict[str, Any] | None:
        return self.rows.get(self._id(ts, rules))

    def add(self, row: dict[str, Any]) -> None:
        row = {"key": self.key, **row}
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rows[self._id(row["ts"], row.get("rules") or [])] = row


def search(base: str | Path, secondaries: Sequence[str | Path], budget: str | Budget, out: str | Path, *,
           max_merges: int = MAX_MERGES, threads: int | None = None, force: bool = False,
           drift_text: str | Path | None = None, per_kind: bool = False, kind_merges: int = KIND_MERGES,
           echo: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Tune each step's t to the edge of ``budget`` (see the module docstring); writes the
    search's files to ``out`` and returns the result (``recipe``: the chosen recipe's data)."""
    from ..formats.identity import identity
    from ..merging import recipe as recipes
    from ..merging.plan import check_output_not_input, plan
    from ..runtime.output import check_name
    from . import drift
    from . import models as loader
    from .quick import fixed_text

    budget = parse_budget(budget) if isinstance(budget, str) else budget
    if not 2 <= max_merges <= 64:
        raise InvalidValue(f"--max-merges {max_merges}: give 2 to 64 merges a step")
    if not secondaries:
        raise NearswapError("give a base and at least one secondary")
    if per_kind and len(secondaries) > 1:
        raise NearswapError("--per-kind tunes one step for now: give one secondary (a chain's later steps would "
                            "be measured against per-kind t that the counting pass does not apply yet)")
    loader.require(lm_eval=False)
    out = Path(out)
    check_name(out)
    rec0 = recipes.build({"base": str(base), "steps": [{"model": str(s), "t": 0} for s in secondaries]}, "tune")
    plan_ = plan(rec0)
    check_output_not_input(out, [plan_.base, *plan_.secondaries])
    base_candidate = loader.check([base], ["base"])[0]
    loader.check(list(secondaries), [f"secondary {i}" for i in range(1, len(secondaries) + 1)], tokenizer=False)
    text = _read(drift_text) if drift_text is not None else fixed_text()
    _prepare(out, force)
    base_hf = loader.hf_directory(base_candidate, echo)
    from .._version import __version__

    key = hashlib.sha256(json.dumps([__version__, [identity(p) for p in (base, *secondaries)], text,
                                     rec0.to_dict()["dtype"]]).encode()).hexdigest()[:32]
    trials = Trials(out / TRIALS, key)
    if trials.rows:
        echo(f"continuing: {len(trials.rows)} candidate(s) measured by an earlier run of this tune")
    model, tokenizer = loader.load(base_hf, threads)
    reference = drift.reference(model, tokenizer, text)
    del model
    merges = 0

    def measure(ts: list[float], rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The chain at ``ts`` (the last step with ``rules``: per-kind t), merged and measured,
        or as an earlier run measured it."""
        nonlocal merges
        rules = rules or []
        found = trials.get(ts, rules)
        if found is not None:
            return found
        from ..merging import sinks

        where = out / "candidate"
        remove_own_merge(where)  # (a killed run's; anything else there is refused, never removed)
        steps = [{"model": str(s), "t": t} for s, t in zip(secondaries, ts)]
        if rules:
            steps[-1]["rules"] = rules
        rec = recipes.build({"base": str(base), "steps": steps}, "tune")
        report = sinks.merge(rec, where, threads=threads)
        merges += 1
        candidate, _ = loader.load(where, threads, tokenizer=base_hf)
        d = drift.compare(reference, candidate)
        del candidate
        remove_own_merge(where)
        step = report["steps"][-1]
        row = {"step": len(ts), "ts": ts, "rules": rules, "t": ts[-1], "share": step["swapped"] / step["total"],
               "changed": report.get("all_steps", step)["changed"] / step["total"],
               **{k: d[k] for k in ("kl_mean", "kl_median", "kl_p99", "top1_agreement", "perplexity")}}
        row["within"] = budget.holds(row)
        trials.add(row)
        echo(f"step {len(ts)}: t={ts[-1]:.6g} swaps {100 * row['share']:.2f}%: {budget.name} "
             f"{row[budget.key]:.4g} -> {'within' if row['within'] else 'over'} the budget")
        return row

    chosen: list[float] = []
    steps_out: list[dict[str, Any]] = []
    previous: dict[str, Any] | None = None  # the chain so far, as measured (None: the base, drift 0)
    for k in range(len(secondaries)):
        axis_ = axis(plan_, k, chosen, threads)
        tried: list[dict[str, Any]] = []
        t_all = axis_.t_at(1.0)  # the merge that takes every differing weight: the secondary itself
        top = measure([*chosen, t_all])
        tried.append(top)
        best: dict[str, Any] | None = top if top["within"] else previous
        best_t = t_all if top["within"] else 0.0
        lo, hi = 0.0, 1.0  # shares: lo within the budget (0: the chain so far), hi over it
        for _ in range(48):  # halvings of the share interval; a merge only where its t is new
            if top["within"] or len(tried) >= max_merges:
                break
            mid = (lo + hi) / 2
            t = axis_.t_at(mid)
            row = next((r for r in tried if r["t"] == t), None)
            if row is None:
                row = measure([*chosen, t])
                tried.append(row)
            if row["within"]:
                lo = mid
                if t > best_t:
                    best, best_t = row, t
            else:
                hi = mid
        over = [r["t"] for r in tried if not r["within"]]
        steps_out.append({"step": k + 1, "secondary": str(secondaries[k]), "t": best_t,
                          "share": axis_.share_at(best_t), "first_over": min(over) if over else None,
                          "drift": {key_: best[key_] for key_ in ("kl_mean", "kl_p99", "top1_agreement", "perplexity")}
                          if best is not None else {"kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0,
                                                    "perplexity": None},
                          "candidates": sorted(tried, key=lambda r: r["t"])})
        chosen.append(best_t)
        previous = best
        echo(f"step {k + 1}: t = {best_t:.6g} ({100 * steps_out[-1]['share']:.2f}% swapped)"
             + (f"; the next candidate, t = {min(over):.6g}, is over the budget" if over else ""))
    steps_data: list[dict[str, Any]] = [{"model": str(s), "t": t} for s, t in zip(secondaries, chosen)]
    kinds = None
    if per_kind:
        kinds = _per_kind(plan_, steps_out[0], previous, measure, kind_merges, threads, echo)
        if kinds["rules"]:
            steps_data[0]["rules"] = kinds["rules"]
    chosen_recipe = recipes.build({"base": str(base), "steps": steps_data}, "tune")
    result = {"budget": str(budget), "metric": budget.key, "bound": budget.bound, "op": budget.op,
              "base": str(base), "secondaries": [str(s) for s in secondaries], "max_merges": max_merges,
              "merges": merges, "steps": steps_out, "per_kind": kinds, "recipe": chosen_recipe.to_dict()}
    (out / "recipe.yaml").write_text(chosen_recipe.to_yaml(relative_to=out.absolute()))
    (out / "tune.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "tune.md").write_text(markdown(result) + "\n")
    plot(result, out / "frontier.png")
    return result


def _per_kind(plan_: Any, single: dict[str, Any], start: dict[str, Any] | None, measure: Callable[..., dict[str, Any]],
              kind_merges: int, threads: int | None, echo: Callable[[str], None]) -> dict[str, Any]:
    """A t per group of tensors (norms, attention, MLP, embeddings: recipe rules) within the same
    budget, by coordinate ascent from the single-t answer: each group in turn, largest first,
    its t raised on its own share axis while the others stay — a small raise first, doubled
    while within the budget, then halving towards the edge — a raise kept only where the budget
    holds. The swapped share and the drift are each monotone in every group's
    t, so each move keeps the point within the budget and only adds swapped weights; what it
    finds is a better point, not a proven optimum. Returns the groups' t, the rules, the share."""
    import fnmatch

    t0 = single["t"]
    members = {name: [task for task in plan_.tasks if task.merged and any(fnmatch.fnmatchcase(task.name, g)
                                                                          for g in globs)
                      and not any(fnmatch.fnmatchcase(task.name, g) for n2, gl in GROUPS[:i] for g in gl)]
               for i, (name, globs) in enumerate(GROUPS)}
    present = sorted((name for name in members if members[name]), key=lambda n: -sum(x.numel for x in members[n]))
    current = {name: t0 for name in present}

    used = {g for globs in (gl for _, gl in GROUPS) for g in globs
            if any(fnmatch.fnmatchcase(task.name, g) for task in plan_.tasks)}  # (a rule matching nothing warns)

    def rules() -> list[dict[str, Any]]:
        return [{"match": g, "t": current[name]} for name, globs in GROUPS if name in current for g in globs
                if current[name] != t0 and g in used]

    best = start
    moves: list[dict[str, Any]] = []
    tried: list[dict[str, Any]] = []
    for name in present:
        sub = _Subset(plan_, members[name])
        axis_ = axis(sub, 0, [], threads)
        # galloping: a small raise first (1/16 of what is left of the group's share axis), doubled while
        # within the budget, then halving between the last within and the first over
        lo, hi = axis_.share_at(current[name]), None
        step = (1.0 - lo) / 16
        spent = 0
        for _ in range(64):
            if spent >= kind_merges or lo >= 1.0:
                break
            target = min(1.0, lo + step) if hi is None else (lo + hi) / 2
            t = axis_.t_at(target)
            if t <= current[name]:  # inside the bucket of the t it has: a larger raise, or as fine as it gets
                if hi is None:
                    step *= 2
                else:
                    lo = target
                continue
            before = current[name]
            current[name] = t
            row = measure([t0], rules())
            spent += 1
            tried.append({"group": name, "t": t, **{k: row[k] for k in ("share", "kl_mean", "kl_p99", "top1_agreement",
                                                                        "perplexity", "within")}})
            if row["within"]:
                lo, best = target, row
                moves.append({"group": name, "t": t, "share": row["share"]})
                if hi is None:
                    step *= 2
            else:
                current[name], hi = before, target
        echo(f"per kind: {name} at t = {current[name]:.6g}")
    single_share = start["share"] if start is not None else 0.0
    share = best["share"] if best is not None else single_share
    better = share > single_share and bool(rules())
    echo(f"per kind: {100 * share:.2f}% swapped within the budget against {100 * single_share:.2f}% at one t"
         if better else "per kind: no point with more weights swapped than the single t was found within the budget "
                        f"({kind_merges} merge(s) a group)")
    return {"groups": current, "rules": rules() if better else [], "share": share if better else single_share,
            "single_share": single_share, "moves": moves, "candidates": tried,
            "drift": {k: best[k] for k in ("kl_mean", "kl_p99", "top1_agreement")} if better and best else None}


class _Subset:
    """A plan restricted to some of its tensors (a group's share axis)."""

    def __init__(self, plan_: Any, tasks: list[Any]) -> None:
        self.tasks, self.recipe = tasks, plan_.recipe


def _read(path: str | Path) -> str:
    from ..core.files import read_bytes

    return read_bytes(Path(path), 16 << 20, "--drift-text").decode("utf-8", "replace")


def remove_own_merge(where: Path) -> None:
    """Remove ``where`` if it is a merge nearswap wrote (its report and recipe are there), checked
    at this moment; refuse anything else there: a tune removes only what a tune made."""
    from ..merging.layout import RECIPE_NAME, REPORT_NAME

    if not os.path.lexists(where):
        return
    if where.is_symlink() or not where.is_dir() or not (where / REPORT_NAME).is_file() \
            or not (where / RECIPE_NAME).is_file():
        raise NearswapError(f"{where} is not a merge a tune wrote; move it away, or give another -o")
    shutil.rmtree(where)


def _prepare(out: Path, force: bool) -> None:
    """``out`` as a tune's folder: new, or one an earlier tune wrote (its trials are taken where
    they are of these inputs; ``force`` discards them and starts over). A folder holding anything
    else is refused, ``force`` or not: a tune never removes what it did not write."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise NearswapError(f"{out} exists and is not a folder; give another -o")
    if out.is_dir():
        entries = set(os.listdir(out))
        ours = {TRIALS, "candidate", "merged", *FILES}
        if entries - ours:
            raise NearswapError(f"{out} holds files that are not a tune's ({', '.join(sorted(entries - ours)[:3])}); "
                                "give another -o")
        if force:
            (out / TRIALS).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def markdown(result: dict[str, Any]) -> str:
    """Every candidate of every step: t, share swapped, drift, and whether it is within the budget."""
    lines = [f"Budget: {result['budget']} ({result['metric']}), {result['merges']} merge(s) this run", "",
             "| step | t | swapped | KL mean | KL p99 | top-1 | perplexity | within | chosen |",
             "|---|---|---|---|---|---|---|---|---|"]
    for step in result["steps"]:
        for r in step["candidates"]:
            lines.append(f"| {step['step']} | {r['t']:.6g} | {100 * r['share']:.2f}% | {r['kl_mean']:.4g} | "
                         f"{r['kl_p99']:.4g} | {r['top1_agreement']:.4f} | {r['perplexity']:.3f} | "
                         f"{'yes' if r['within'] else 'no'} | {'**yes**' if r['t'] == step['t'] else ''} |")
    kinds = result.get("per_kind")
    if kinds:
        lines += ["", "| group | t | swapped | KL mean | within |", "|---|---|---|---|---|"]
        lines += [f"| {r['group']} | {r['t']:.6g} | {100 * r['share']:.2f}% | {r['kl_mean']:.4g} | "
                  f"{'yes' if r['within'] else 'no'} |" for r in kinds["candidates"]]
        lines += ["", ("Per kind: " + ", ".join(f"{g} t = {t:.6g}" for g, t in kinds["groups"].items())
                       + f": {100 * kinds['share']:.2f}% swapped, against {100 * kinds['single_share']:.2f}% at one t"
                       if kinds["rules"] else "Per kind: no point with more weights swapped than the single t was "
                       "found within the budget")]
    lines += ["", "Chosen: " + ", ".join(f"step {s['step']} t = {s['t']:.6g} ({100 * s['share']:.2f}% swapped, "
                                         f"running {result['metric']} {s['drift'][result['metric']]:.4g})"
                                         for s in result["steps"])]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """The frontier: each candidate's drift against the share it swaps, per step, the budget's line."""
    from ..core import plots

    fig, ax = plots.figure((7, 4.5))
    for step in result["steps"]:
        rows = step["candidates"]
        ax.scatter([100 * r["share"] for r in rows], [r[result["metric"]] for r in rows], label=f"step {step['step']}",
                   zorder=3)
        ax.scatter([100 * step["share"]], [step["drift"][result["metric"]]], marker="*", s=160, color="black", zorder=4)
    ax.axhline(result["bound"], color="tab:red", ls="--", lw=1, label=f"budget {result['budget']}")
    ax.set_xlabel("% of weights swapped by the step")
    ax.set_ylabel(result["metric"] + " (from the base)")
    ax.legend(fontsize=8)
    ax.set_title("nearswap tune: drift against swap share (star: chosen)")
    plots.save(fig, path, dpi=120, bbox_inches="tight")
