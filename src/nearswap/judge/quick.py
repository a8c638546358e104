"""Does a merged model still write? Perplexity on a fixed text and a seeded generation.

Needs the ``eval`` extra (torch + transformers, CPU); models come from ``models.load``. The fixed text is the opening of
Lewis Carroll's *Alice's Adventures in Wonderland* (1865, public domain), shipped with
the package, so scores are comparable across machines and runs.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

from .writing import PROMPTS

STORY_PROMPT = PROMPTS[0]  # the demo's and the sweep's story: the first of the writing judge's prompts


def fixed_text() -> str:
    """The evaluation text (public domain)."""
    return resources.files("nearswap").joinpath("data/alice.txt").read_text(encoding="utf-8")


def perplexity(model: Any, tokenizer: Any, text: str | None = None, max_tokens: int = 1024) -> float:
    """exp(mean negative log-likelihood) of ``text`` (default: the fixed text), first ``max_tokens``
    tokens, for a model loaded by ``models.load``."""
    import torch

    ids = tokenizer(text or fixed_text(), return_tensors="pt").input_ids[:, :max_tokens]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    return math.exp(loss.item())


def generate(model: Any, tokenizer: Any, prompt: str = STORY_PROMPT, max_new_tokens: int = 60, seed: int = 0,
             temperature: float = 0.7) -> str:
    """A seeded, sampled continuation of ``prompt`` (same seed, same model: same text)."""
    import torch

    torch.manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                             top_p=0.95, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0][ids.input_ids.shape[1]:], skip_special_tokens=True)


def continuation_perplexity(model: Any, tokenizer: Any, prompt: str, continuation: str) -> float:
    """Perplexity of ``continuation`` given ``prompt`` (only the continuation's tokens count)."""
    import torch

    p = tokenizer(prompt, return_tensors="pt").input_ids
    full = tokenizer(prompt + continuation, return_tensors="pt").input_ids
    labels = full.clone()
    labels[:, : p.shape[1]] = -100
    if (labels != -100).sum() == 0:
        return float("inf")
    with torch.no_grad():
        return math.exp(model(full, labels=labels).loss.item())
