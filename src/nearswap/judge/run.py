"""The evaluation loop: one model in memory at a time — load, benchmarks, drift, stories, free."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.paths import default_threads
from . import models as loader
from .tasks import Selected


@dataclass
class ModelResults:
    name: str
    tasks: dict[str, Any] = field(default_factory=dict)  # nearswap task name -> harness.TaskResult
    drift: dict[str, Any] | None = None
    stories: list[Any] = field(default_factory=list)  # writing.Story
    writing: dict[str, Any] | None = None
    rescored: int = 0  # documents scored again exactly (lm.NearswapLM)
    requests: int = 0
    tokens: int = 0  # input tokens of the requests, as lm-eval's backend would feed them
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Shared:
    """What every model is compared with, taken from the reference (the first model): its
    next-token distributions on the drift text, and its tokenizer's words (for ``nondict``)."""

    reference: Any = None  # drift.Reference
    dictionary: Any = None


def run_models(candidates: list[loader.Candidate], selected: list[Selected], limit: int | None,
               phrases: dict[str, str] | None, text: str | None, config_dir: Path, threads: int | None,
               echo: Callable[[str], None], progress: Callable[[str, int, int], None] | None) -> list[ModelResults]:
    """Every model in turn, in this process; the reference's figures are taken while it is loaded."""
    shared = Shared()
    results = []
    for i, cand in enumerate(candidates):
        if cand.backend == "torch":
            loader.hf_directory(cand, echo)
        echo(f"[{i + 1}/{len(candidates)}] {cand.name}: loading ({cand.backend})")
        results.append(evaluate_one(cand, selected, limit, phrases, text, config_dir, threads, shared, progress))
    return results


def run_models_ray(candidates: list[loader.Candidate], selected: list[Selected], limit: int | None,
                   phrases: dict[str, str] | None, text: str | None, config_dir: Path, threads: int | None,
                   address: str, echo: Callable[[str], None]) -> list[ModelResults]:
    """One model per Ray task (``distributed.map_tasks``), all at once on whichever nodes have
    a CPU free; a task whose model is not the reference first takes the reference's figures
    from the reference model itself. GGUFs are converted here, once, before any task starts; the
    models, the cache and the report directory must be on storage every node sees."""
    from ..runtime import distributed

    for cand in candidates:
        if cand.backend == "torch":
            loader.hf_directory(cand, echo)
    import dataclasses

    sent = [dataclasses.replace(cand, model=None) for cand in candidates]  # paths and names, not open headers
    calls = [(cand, sent[0] if i else None, selected, limit, phrases, text, config_dir, threads)
             for i, cand in enumerate(sent)]
    echo(f"evaluating {len(calls)} models as Ray tasks on {address}")
    done = iter(range(1, len(calls) + 1))
    return distributed.map_tasks(model_task, calls, address,
                                 lambda r: echo(f"[{next(done)}/{len(calls)}] {r.name}: done"))


def model_task(cand: loader.Candidate, reference: loader.Candidate | None, selected: list[Selected],
               limit: int | None, phrases: dict[str, str] | None, text: str | None, config_dir: Path,
               threads: int | None) -> ModelResults:
    """A Ray task: one model's evaluation (``reference``: the reference model, None when this
    model is the reference)."""
    shared = Shared()
    if reference is not None and not cand.tasks_only and (text is not None or phrases is not None):
        model, tokenizer = loader.open_for_eval(reference, threads or default_threads())
        _take_reference(shared, model, tokenizer, text, phrases)
        _close(model)
        del model, tokenizer
        gc.collect()
    return evaluate_one(cand, selected, limit, phrases, text, config_dir, threads, shared, None)


def _close(model: Any) -> None:
    from ..runtime.llama_model import LlamaModel

    if isinstance(model, LlamaModel):  # llama.cpp's memory is freed now, not at some collection
        model.close()


def _take_reference(shared: Shared, model: Any, tokenizer: Any, text: str | None, phrases: dict[str, str] | None) -> None:
    from . import drift as drift_mod

    if text is not None and shared.reference is None:
        shared.reference = drift_mod.reference(model, tokenizer, text)
    if phrases is not None and shared.dictionary is None:
        from .writing import vocabulary_words

        shared.dictionary = vocabulary_words(tokenizer)  # the reference tokenizer's words, for every model


def evaluate_one(cand: loader.Candidate, selected: list[Selected], limit: int | None,
                 phrases: dict[str, str] | None, text: str | None, config_dir: Path, threads: int | None,
                 shared: Shared, progress: Callable[[str, int, int], None] | None) -> ModelResults:
    """Load one model on its backend and run what was asked of it; a ``shared`` still empty is
    filled from this model (it is the reference)."""
    import time

    from . import drift as drift_mod
    from . import harness

    name = cand.name
    if cand.tasks_only:
        text = phrases = None
    model, tokenizer = loader.open_for_eval(cand, threads or default_threads())
    _take_reference(shared, model, tokenizer, text, phrases)
    res = ModelResults(name)
    if selected:
        t = time.perf_counter()
        on_progress = (lambda done, total: progress(f"{name}: benchmarks", done, total)) if progress else None
        lm = lm_for(cand, model, tokenizer, on_progress)
        res.tasks = harness.run(lm, selected, config_dir, limit)
        res.rescored, res.requests, res.tokens = lm.exact_rescored, lm.requests_scored, lm.input_tokens
        res.seconds["benchmarks"] = time.perf_counter() - t
        del lm
    if text is not None:
        t = time.perf_counter()
        res.drift = drift_mod.compare(shared.reference, model)
        res.seconds["drift"] = time.perf_counter() - t
    if phrases is not None:
        from . import writing

        t = time.perf_counter()
        total = len(writing.PROMPTS) * len(writing.SEEDS)
        if progress:
            progress(f"{name}: stories", 0, total)
        res.stories = writing.generate(model, tokenizer)
        if progress:
            progress(f"{name}: stories", total, total)
        res.writing = writing.score(res.stories, phrases, shared.dictionary)
        res.seconds["writing"] = time.perf_counter() - t
    _close(model)
    del model, tokenizer
    gc.collect()
    return res


def lm_for(cand: loader.Candidate, model: Any, tokenizer: Any,
           on_progress: Callable[[int, int], None] | None = None) -> Any:
    """The lm-eval LM of a loaded model on its candidate's backend."""
    if cand.backend == "llama.cpp":
        from .llama_lm import make_llama_lm

        return make_llama_lm(model, on_progress)
    from .lm import make_lm

    return make_lm(model, tokenizer, on_progress=on_progress)


def per_request(path: Path, backend: str, selected: list[Selected], config_dir: Path,
                limit: int | None) -> tuple[dict[tuple[str, str], tuple[float, bool]], dict[str, Any]]:
    """One model's tasks through lm-eval on ``backend``, keeping every request's answer:
    ((context, continuation) -> (log-likelihood, greedy)) and the tasks' results. What the
    backends are compared by (tests, benchmarks/bench_llama_backend.py)."""
    from . import harness

    cand = loader.check([path], backend=backend)[0]
    model, tokenizer = loader.open_for_eval(cand, None)
    lm = lm_for(cand, model, tokenizer)
    seen: dict[tuple[str, str], tuple[float, bool]] = {}
    inner = lm.loglikelihood

    def loglikelihood(requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = inner(requests, disable_tqdm=disable_tqdm)
        seen.update({tuple(r.args): o for r, o in zip(requests, out)})
        return out

    lm.loglikelihood = loglikelihood
    try:
        return seen, harness.run(lm, selected, config_dir, limit)
    finally:
        _close(model)
