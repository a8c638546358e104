"""The evaluation loop: one model in memory at a time — load, benchmarks, drift, stories, free."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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


def run_models(candidates: list[loader.Candidate], selected: list[Selected], limit: int | None,
               phrases: dict[str, str] | None, text: str | None, config_dir: Path, threads: int | None,
               echo: Callable[[str], None], progress: Callable[[str, int, int], None] | None) -> list[ModelResults]:
    import time

    from . import drift as drift_mod
    from . import harness
    from .lm import make_lm

    results = []
    reference = None
    dictionary = None
    for i, cand in enumerate(candidates):
        directory = loader.hf_directory(cand, echo)
        echo(f"[{i + 1}/{len(candidates)}] {cand.name}: loading")
        model, tokenizer = loader.load(directory, threads or loader.default_threads())
        res = ModelResults(cand.name)
        if selected:
            t = time.perf_counter()
            lm = make_lm(model, tokenizer, on_progress=(lambda done, total, n=cand.name: progress(f"{n}: benchmarks", done, total))
                         if progress else None)
            res.tasks = harness.run(lm, selected, config_dir, limit)
            res.rescored, res.requests, res.tokens = lm.exact_rescored, lm.requests_scored, lm.input_tokens
            res.seconds["benchmarks"] = time.perf_counter() - t
            del lm
        if text is not None:
            t = time.perf_counter()
            if reference is None:
                reference = drift_mod.reference(model, tokenizer, text)
            res.drift = drift_mod.compare(reference, model)
            res.seconds["drift"] = time.perf_counter() - t
        if phrases is not None:
            from . import writing

            t = time.perf_counter()
            if dictionary is None:
                from ..sweep import dictionary as vocabulary_words

                dictionary = vocabulary_words(tokenizer)  # the reference tokenizer's words, for every model
            total = len(writing.PROMPTS) * len(writing.SEEDS)
            if progress:
                progress(f"{cand.name}: stories", 0, total)
            res.stories = writing.generate(model, tokenizer)
            if progress:
                progress(f"{cand.name}: stories", total, total)
            res.writing = writing.score(res.stories, phrases, dictionary)
            res.seconds["writing"] = time.perf_counter() - t
        results.append(res)
        del model, tokenizer
        gc.collect()
    return results
