"""Driving lm-evaluation-harness: task configs pointed at local data, runs, per-item results.

nearswap does not score anything itself here: it writes lm-eval task configs that ``include``
lm-eval's own YAML for each task (prompt, choices, metrics, filters) and override only where
the items come from and which split gives few-shot examples; then it runs them through
``lm_eval.simple_evaluate`` and reads back every item's result (``log_samples``), which the
paired statistics need. The same configs run from lm-eval's own CLI
(``lm_eval --include_path DIR/tasks ...``): the report prints that command.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..core.errors import NearswapError
from . import data
from .tasks import Selected, Task

LM_EVAL_VERSION = "0.4.13"


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000)


def _split_keys(task: Task) -> dict[str, Any]:
    names = {s.name for s in task.splits}
    keys: dict[str, Any] = {"training_split": None, "validation_split": None, "test_split": None}
    keys[f"{task.eval_split}_split"] = task.eval_split
    if task.eval_split == "test" and "validation" in names:
        keys["validation_split"] = "validation"
    keys["fewshot_split"] = task.fewshot_split
    return keys


SAMPLES_FILE = "samples.json"


def write_configs(selected: list[Selected], directory: Path, limit: int | None = None,
                  cache: Path | None = None) -> list[str]:
    """Write one lm-eval config per task (and per MMLU subject, plus its group) into
    ``directory``, and the items ``limit`` means where lm-eval's --limit would not say it
    (``samples.json``, for its --samples); returns the lm-eval task names to run."""
    base = lm_eval_tasks_dir()
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for sel in selected:
        task = sel.task
        if task.subtasks:
            for subject in task.subtasks:
                files = {split: str(data.split_path(task, s, cache)) for s in task.splits
                         for split in (s.name.split("/")[1],) if s.name.startswith(subject + "/")}
                config = {"include": str(base / task.lm_eval_yaml.rsplit("/", 1)[0] / f"mmlu_{subject}.yaml"),
                          "task": f"{task.lm_eval_name}_{subject}", "tag": f"{task.lm_eval_name}_tasks",
                          "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files},
                          "test_split": "test", "fewshot_split": "dev", "num_fewshot": sel.shots}
                (directory / f"{task.lm_eval_name}_{subject}.yaml").write_text(_yaml(config))
            group = {"group": task.lm_eval_name, "task": [f"{task.lm_eval_name}_tasks"],
                     "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
            (directory / f"{task.lm_eval_name}.yaml").write_text(_yaml(group))
        else:
            files = {s.name: str(data.split_path(task, s, cache)) for s in task.splits}
            config = {"include": str(base / task.lm_eval_yaml), "task": task.lm_eval_name, "tag": "nearswap",
                      "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files},
                      **_split_keys(task), "num_fewshot": sel.shots, **task.overrides}
            (directory / f"{task.lm_eval_name}.yaml").write_text(_yaml(config))
        names.append(task.lm_eval_name)
    chosen = samples(selected, limit)
    if chosen:
        (directory / SAMPLES_FILE).write_text(json.dumps(chosen) + "\n")
    return names


@dataclass
class TaskResult:
    """One task, one model: lm-eval's aggregate and every item's score on the headline metric."""

    task: str
    metric: str
    value: float
    items: dict[str, float] = field(default_factory=dict)  # "subtask/doc_id" -> 0/1 (or the metric's value)
    n: int = 0
    lm_eval: dict[str, Any] = field(default_factory=dict)  # lm-eval's own results entry


QUIET_LOGGERS = ("lm_eval", "lm-eval", "datasets", "transformers", "filelock", "huggingface_hub")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """While nearswap drives lm-eval: its libraries' INFO logs and bars off (the terminal is for
    nearswap's progress; the run also hides their stderr, see ``run``) and the hub offline
    (the data are local). Everything is put back afterwards: no process-wide side effect."""
    import datasets
    from datasets.utils import logging as datasets_logging

    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    env = {key: os.environ.get(key) for key in OFFLINE}
    bars = datasets_logging.is_progress_bar_enabled()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if bars:
            datasets.enable_progress_bars()


def samples(selected: list[Selected], limit: int | None) -> dict[str, list[int]] | None:
    """Which items ``limit`` means when a group (MMLU) is selected: the first N of every task,
    and for a group N in all, the first ceil(N / subtasks) of each subtask (lm-eval's own
    --limit would take N of each of MMLU's 57 subjects). None where --limit says it already."""
    if limit is None or not any(s.task.subtasks for s in selected):
        return None
    out: dict[str, list[int]] = {}
    for sel in selected:
        task = sel.task
        if task.subtasks:
            per = -(-limit // len(task.subtasks))
            for sub in task.subtasks:
                count = next(sp.count for sp in task.splits if sp.name == f"{sub}/{task.eval_split}")
                out[f"{task.lm_eval_name}_{sub}"] = list(range(min(per, count)))
        else:
            count = next(sp.count for sp in task.splits if sp.name == task.eval_split)
            out[task.lm_eval_name] = list(range(min(limit, count)))
    return out


def run(lm: Any, selected: list[Selected], config_dir: Path, limit: int | None) -> dict[str, TaskResult]:
    """Evaluate ``lm`` (an lm-eval LM) on ``selected``; results by nearswap task name."""
    with quiet_libraries():
        return _run(lm, selected, config_dir, limit)


def _run(lm: Any, selected: list[Selected], config_dir: Path, limit: int | None) -> dict[str, TaskResult]:
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(config_dir), include_defaults=False)
    names = [s.task.lm_eval_name for s in selected]
    hidden = io.StringIO()
    # lm-eval records the git commit of the current directory, whatever it is, by running git
    # (which prints "fatal: not a git repository" outside one): it says nothing about this run.
    git_hash, evaluator.get_git_commit_hash = evaluator.get_git_commit_hash, lambda: None
    try:
        # lm-eval draws a tqdm bar per step of building requests: nearswap's caller shows one per phase
        with contextlib.redirect_stderr(hidden):
            chosen = samples(selected, limit)
            out = evaluator.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=None if chosen else limit,
                                            samples=chosen, log_samples=True,
                                            bootstrap_iters=0, random_seed=0, numpy_random_seed=1234,
                                            torch_random_seed=1234, fewshot_random_seed=1234)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise NearswapError(f"lm-evaluation-harness could not run the tasks ({type(e).__name__}: {str(e)[:200]})") from None
    finally:
        evaluator.get_git_commit_hash = git_hash
    results = {}
    for sel in selected:
        task = sel.task
        metric_key = f"{task.metric},none" if "," not in task.metric else task.metric
        entry = out["results"][task.lm_eval_name]
        metric = task.metric.split(",")[0]
        items: dict[str, float] = {}
        subtasks = [f"{task.lm_eval_name}_{s}" for s in task.subtasks] or [task.lm_eval_name]
        for name in subtasks:
            for sample in out["samples"].get(name, []):
                key = f"{name.removeprefix(task.lm_eval_name).lstrip('_') or task.name}/{sample['doc_id']}"
                items[key] = float(sample[metric] if metric in sample else sample[metric_key.split(",", 1)[0]])
        results[task.name] = TaskResult(task.name, task.metric, float(entry[metric_key]), items, len(items), entry)
    return results


def cli_command(selected: list[Selected], config_dir: Path, model_path: Path, limit: int | None,
                converted_from: Path | None = None) -> str:
    """The lm-eval command line that runs the same tasks on the same items with lm-eval's own HF
    backend. A GGUF (``converted_from``) is named as the user gave it, with the command that
    makes its HF twin first: the path of nearswap's cached copy is of this machine only."""
    names = ",".join(s.task.lm_eval_name for s in selected)
    chosen = samples(selected, limit)
    lim = f" --samples {config_dir / SAMPLES_FILE}" if chosen else f" --limit {limit}" if limit else ""
    first = ""
    if converted_from is not None:
        model_path = Path(f"{converted_from.stem}_hf")
        first = f"nearswap convert {converted_from} {model_path} && "
    return (f"{first}lm_eval --model hf --model_args pretrained={model_path},dtype=float32 --device cpu "
            f"--include_path {config_dir} --tasks {names}{lim}")


def versions() -> dict[str, str]:
    import lm_eval
    import torch
    import transformers

    return {"lm_eval": getattr(lm_eval, "__version__", LM_EVAL_VERSION), "torch": torch.__version__,
            "transformers": transformers.__version__}


def dump(results: dict[str, TaskResult]) -> str:
    return json.dumps({k: {"metric": r.metric, "value": r.value, "n": r.n} for k, r in results.items()})
