"""Does a merged model still write? Perplexity on a fixed text and a seeded generation.

Needs the ``eval`` extra (torch + transformers, CPU). The fixed text is the opening of
Lewis Carroll's *Alice's Adventures in Wonderland* (1865, public domain), shipped with
the package, so scores are comparable across machines and runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..core.errors import NearswapError

STORY_PROMPT = "Once upon a time, in a small village by the sea, there lived"


def fixed_text() -> str:
    """The evaluation text (public domain)."""
    return resources.files("nearswap").joinpath("data/alice.txt").read_text(encoding="utf-8")


def _torch_and_transformers() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        raise NearswapError("evaluation needs the eval extra: pip install 'nearswap[eval]' "
                            "(torch==2.13.0 is the CPU build)") from None
    return torch, transformers


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    path: Path


def load(path: str | Path, tokenizer_path: str | Path | None = None) -> LoadedModel:
    """Load an HF checkpoint (float32, CPU) and its tokenizer (from ``tokenizer_path`` if given)."""
    from .models import quiet_transformers

    torch, transformers = _torch_and_transformers()
    path = Path(path)
    with quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_path or path))
    return LoadedModel(model, tokenizer, path)


def perplexity(m: LoadedModel, text: str | None = None, max_tokens: int = 1024) -> float:
    """exp(mean negative log-likelihood) of ``text`` (default: the fixed text), first ``max_tokens`` tokens."""
    torch, _ = _torch_and_transformers()
    ids = m.tokenizer(text or fixed_text(), return_tensors="pt").input_ids[:, :max_tokens]
    with torch.no_grad():
        loss = m.model(ids, labels=ids).loss
    return math.exp(loss.item())


def generate(m: LoadedModel, prompt: str = STORY_PROMPT, max_new_tokens: int = 60, seed: int = 0,
             temperature: float = 0.7) -> str:
    """A seeded, sampled continuation of ``prompt`` (same seed, same model: same text)."""
    torch, _ = _torch_and_transformers()
    torch.manual_seed(seed)
    ids = m.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = m.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                               top_p=0.95, pad_token_id=m.tokenizer.eos_token_id)
    return m.tokenizer.decode(out[0][ids.input_ids.shape[1]:], skip_special_tokens=True)
