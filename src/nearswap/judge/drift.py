"""Drift from the reference: how far a model's next-token distributions moved, token by token.

What llama.cpp's ``--kl-divergence`` mode reports, on a fixed text: at every position, the
KL divergence KL(P_ref || P_model) of the model's next-token distribution from the
reference's (mean, median, 99th percentile), the share of positions where both put the same
token first (top-1 agreement), and each model's perplexity. At the soft t of the model card a
merge's benchmark scores hardly move, but its distributions do: this is the most sensitive
signal nearswap has, and the one ``sweep`` uses.

The text is fixed and shipped (public domain; see ``nearswap.judge.quick.fixed_text``), so the
figures compare across runs and machines; ``--drift-text FILE`` takes another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_TOKENS = 1024
ROWS = 128  # positions compared at once (each row is a vocabulary of float64s)


@dataclass
class Reference:
    """The reference model's log-probabilities on the text, kept to compare the others with."""

    ids: list[int]  # the text's tokens, by the reference's tokenizer (every model reads these ids)
    logp: Any  # numpy float32 [tokens - 1, vocab]: log P(next token) at each position


def _is_llama(model: Any) -> bool:
    from ..runtime.llama_model import LlamaModel

    return isinstance(model, LlamaModel)


def token_ids(tokenizer: Any, text: str, max_tokens: int = MAX_TOKENS) -> list[int]:
    """The text's first tokens: by a transformers tokenizer, or by llama.cpp's vocabulary when
    ``tokenizer`` is a ``LlamaModel`` (BOS where the GGUF asks for it)."""
    if _is_llama(tokenizer):
        return tokenizer.tokenize(text, add_special=tokenizer.adds_bos)[:max_tokens]
    return [int(t) for t in tokenizer(text).input_ids[:max_tokens]]


def log_probs(model: Any, ids: list[int]) -> Any:
    """log P(next token) at every position but the last, float32 numpy, from a transformers
    model (one forward pass) or from llama.cpp (``LlamaModel``)."""
    import numpy as np

    if _is_llama(model):
        from ..runtime.llama_model import log_softmax

        model.keep(0)
        logits = model.logits_from(ids, 0)[:-1]
        return np.concatenate([log_softmax(logits[i:i + ROWS]).astype(np.float32)
                               for i in range(0, len(logits), ROWS)])
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([ids], dtype=torch.long)).logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1).numpy()


def reference(model: Any, tokenizer: Any, text: str, max_tokens: int = MAX_TOKENS) -> Reference:
    ids = token_ids(tokenizer, text, max_tokens)
    return Reference(ids, log_probs(model, ids))


def compare(ref: Reference, model: Any) -> dict[str, Any]:
    """KL(P_ref || P_model) per position (in nats) and its summary, top-1 agreement, and the
    perplexities of both on the text. A model compared with itself gives exactly 0 and 1.0.
    ``model``: a transformers model or a ``LlamaModel`` (a reference from either backend)."""
    import numpy as np

    logp = log_probs(model, ref.ids)
    if logp.shape != ref.logp.shape:
        raise ValueError(f"vocabularies differ ({ref.logp.shape[1]} vs {logp.shape[1]} tokens)")
    kl = np.empty(len(logp))
    for i in range(0, len(logp), ROWS):
        a, b = ref.logp[i:i + ROWS].astype(np.float64), logp[i:i + ROWS].astype(np.float64)
        kl[i:i + ROWS] = np.maximum((np.exp(a) * (a - b)).sum(axis=1), 0.0)  # max: rounding can give -1e-9
    agree = float((ref.logp.argmax(axis=1) == logp.argmax(axis=1)).mean())
    target = np.asarray(ref.ids[1:])
    rows = np.arange(len(target))
    nll_model = -float(logp[rows, target].astype(np.float64).mean())
    nll_ref = -float(ref.logp[rows, target].astype(np.float64).mean())
    q = np.quantile(kl, [0.5, 0.99])
    return {
        "tokens": len(ref.ids),
        "kl_mean": float(kl.mean()),
        "kl_median": float(q[0]),
        "kl_p99": float(q[1]),
        "kl_max": float(kl.max()),
        "top1_agreement": agree,
        "perplexity": math.exp(nll_model),
        "reference_perplexity": math.exp(nll_ref),
        "kl_per_token": [round(float(v), 6) for v in kl],
    }
