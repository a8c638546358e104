"""What each step of a merge did: exact counts per tensor and per step, and their report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypedDict

from ..core.kernels import StepCounts

COUNT_FIELDS = ("total", "identical", "swapped", "moved", "nonfinite", "changed")


SCALE_BITS = 1074  # every finite double is a whole multiple of 2^-1074


def _exact(x: float) -> int:
    """``x`` (finite, >= 0) times 2^1074: an integer, exactly."""
    num, den = x.as_integer_ratio()
    return num * ((1 << SCALE_BITS) // den)


@dataclass
class Tally:
    """Exact element counts (integers) and the summed absolute change. The change is summed
    exactly, as an integer count of 2^-1074 (every double is one), and rounded once when read:
    the same figure whatever the order in which threads finished their chunks, resumed or
    not, in constant memory (a list of the parts, summed by ``math.fsum`` at the end, gave the
    same figure but grew by 32 bytes a chunk)."""

    total: int = 0
    identical: int = 0
    swapped: int = 0
    moved: int = 0
    nonfinite: int = 0
    changed: int = 0  # elements whose held value the step changed (see kernels.StepCounts)
    abs_exact: int = field(default=0, repr=False)  # the change so far, in units of 2^-1074
    abs_other: float = field(default=0.0, repr=False)  # a non-finite part (inf), should one come

    @property
    def abs_change(self) -> float:
        return self.abs_exact / (1 << SCALE_BITS) + self.abs_other  # int / int: correctly rounded

    def _add_change(self, x: float) -> None:
        if math.isfinite(x):
            self.abs_exact += _exact(x)
        else:
            self.abs_other += x

    def add(self, c: StepCounts) -> None:
        self.total += c.identical + c.swapped + c.moved + c.nonfinite
        self.identical += c.identical
        self.swapped += c.swapped
        self.moved += c.moved
        self.nonfinite += c.nonfinite
        self.changed += c.changed
        self._add_change(c.abs_change)

    def merge(self, other: "Tally") -> None:
        """Add ``other``'s counts and its change (exactly)."""
        for name in COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.abs_exact += other.abs_exact
        self.abs_other += other.abs_other

    def to_journal(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in COUNT_FIELDS}, "abs_change": self.abs_change}

    @classmethod
    def from_journal(cls, data: dict[str, Any]) -> "Tally":
        tally = cls(**{k: int(data[k]) for k in COUNT_FIELDS})
        tally._add_change(float(data["abs_change"]))
        return tally

    def share(self, name: str) -> float:
        return getattr(self, name) / self.total if self.total else 0.0

    def to_json(self) -> dict:
        out: dict = {k: getattr(self, k) for k in COUNT_FIELDS}
        out["mean_abs_change"] = self.abs_change / self.total if self.total else 0.0
        return out


@dataclass
class StepReport:
    """One step of the chain: the model merged in, its t, totals and per-tensor tallies."""

    model: str
    label: str
    t: float
    tensors: dict[str, Tally] = field(default_factory=dict)
    t_by_tensor: dict[str, float] = field(default_factory=dict)

    @property
    def totals(self) -> Tally:
        total = Tally()
        for tally in self.tensors.values():
            total.merge(tally)
        return total

    def to_json(self) -> dict:
        out = {"model": self.model, "label": self.label, "t": self.t, **self.totals.to_json()}
        out["tensors"] = {
            name: {**tally.to_json(), **({"t": self.t_by_tensor[name]} if self.t_by_tensor.get(name, self.t) != self.t else {})}
            for name, tally in self.tensors.items()
        }
        return out


@dataclass
class NetChange:
    """What the whole chain changed: per tensor [elements, how many of the output's values
    differ from the base's as the output's dtype holds it]. For one step it is that step's
    ``changed``; over several, a weight moved and moved back is not counted."""

    tensors: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        total = sum(n for n, _ in self.tensors.values())
        changed = sum(c for _, c in self.tensors.values())
        return {"total": total, "changed": changed,
                "tensors": {name: {"total": n, "changed": c} for name, (n, c) in self.tensors.items()}}


class StepJSON(TypedDict):
    """One step in a report (``StepReport.to_json``): counts are exact integers."""

    model: str
    label: str
    t: float
    total: int
    identical: int
    swapped: int
    moved: int
    nonfinite: int
    changed: int  # elements whose value (as held between steps) the step changed
    mean_abs_change: float
    tensors: dict[str, dict[str, Any]]


class MergeReport(TypedDict, total=False):
    """What ``nearswap.merge`` (and ``convert``) return, and ``merge_report.json`` holds."""

    nearswap_version: str
    kernel: str
    base: str
    output_type: str  # the output's dtype ("as base": each tensor's own), or a .gguf output's GGUF type
    carry_float32: bool
    seconds: float
    output: dict[str, Any]  # files, total_size, tensors, parameters (+ copied; + GGUF types)
    steps: list[StepJSON]
    all_steps: dict[str, Any]  # the chain's net change: total, changed (output != base as stored), per tensor
    resumed: dict[str, int]  # a merge that continued an earlier run's output: tensors and bytes it had written


def format_table(steps: list[StepJSON], all_steps: dict[str, Any] | None = None) -> str:
    """The short per-step summary printed after a merge, from a report's ``steps``; with
    ``all_steps`` (the report's net change) and more than one step, a line for the whole chain."""
    lines = []
    for i, step in enumerate(steps, 1):
        share = {k: int(step.get(k) or 0) / step["total"] if step["total"] else 0.0  # type: ignore[call-overload]
                 for k in ("swapped", "moved", "identical", "changed")}
        lines.append(
            f"step {i}  {step['label']:<4} t={step['t']:<8g} swapped {100 * share['swapped']:6.2f}%  "
            f"moved {100 * share['moved']:6.2f}%  identical {100 * share['identical']:6.2f}%  "
            f"changed {100 * share['changed']:6.2f}%  "
            f"nonfinite {step['nonfinite']}  mean|Δ| {step['mean_abs_change']:.3g}{rules_note(step)}"
        )
    if all_steps and len(steps) > 1 and all_steps["total"]:
        lines.append(f"all steps: changed {100 * all_steps['changed'] / all_steps['total']:.2f}% of the weights "
                     "(the output against the base, both as the output stores them)")
    return "\n".join(lines)


def rules_note(step: StepJSON) -> str:
    """What the step's rules changed, for the table: `` (rules: t=0.005 on 12 tensors, t=0 on 1)``;
    empty when every tensor had the step's t."""
    by_t: dict[float, int] = {}
    for entry in step["tensors"].values():
        if "t" in entry:  # (only tensors whose t differs from the step's carry one)
            by_t[entry["t"]] = by_t.get(entry["t"], 0) + 1
    if not by_t:
        return ""
    parts = [f"t={t:g} on {n} tensor{'s' if n != 1 else ''}" for t, n in sorted(by_t.items(), key=lambda kv: -kv[1])]
    return f"  (rules: {', '.join(parts)})"


def journaled_tallies_ok(tallies: Any) -> bool:
    """Whether a tensor's journaled tallies have the form ``ChainPass._tallies`` writes (their
    values are covered by the journal line's tag)."""
    if not isinstance(tallies, dict) or type(tallies.get("changed")) is not int or tallies["changed"] < 0:
        return False
    steps = tallies.get("steps")
    if not isinstance(steps, list):
        return False
    try:
        for step in steps:
            Tally.from_journal(step)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError):
        return False
    return True
