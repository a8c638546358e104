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


@dataclass
class Reference:
    """The reference model's log-probabilities on the text, kept to compare the others with."""

    ids: Any  # torch.LongTensor [tokens]
    logp: Any  # torch.FloatTensor [tokens - 1, vocab]: log P(next token) at each position


def token_ids(tokenizer: Any, text: str, max_tokens: int = MAX_TOKENS) -> Any:
    return tokenizer(text, return_tensors="pt").input_ids[0, :max_tokens]


def log_probs(model: Any, ids: Any) -> Any:
    """log P(next token) at every position but the last, float32, in one forward pass."""
    import torch

    with torch.inference_mode():
        logits = model(ids[None]).logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1)


def reference(model: Any, tokenizer: Any, text: str, max_tokens: int = MAX_TOKENS) -> Reference:
    ids = token_ids(tokenizer, text, max_tokens)
    return Reference(ids, log_probs(model, ids))


def compare(ref: Reference, model: Any) -> dict[str, Any]:
    """KL(P_ref || P_model) per position (in nats) and its summary, top-1 agreement, and the
    perplexities of both on the text. A model compared with itself gives exactly 0 and 1.0."""
    import torch

    logp = log_probs(model, ref.ids)
    if logp.shape != ref.logp.shape:
        raise ValueError(f"vocabularies differ ({ref.logp.shape[1]} vs {logp.shape[1]} tokens)")
    with torch.inference_mode():
        p = ref.logp.exp()
        kl = (p * (ref.logp - logp)).sum(dim=-1).clamp_min(0.0)  # clamp: rounding can give -1e-9
        agree = (ref.logp.argmax(dim=-1) == logp.argmax(dim=-1)).float().mean().item()
        target = ref.ids[1:]
        nll_model = -logp.gather(1, target[:, None]).mean().item()
        nll_ref = -ref.logp.gather(1, target[:, None]).mean().item()
        q = torch.quantile(kl.double(), torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
    return {
        "tokens": int(ref.ids.shape[0]),
        "kl_mean": float(kl.double().mean()),
        "kl_median": q[0],
        "kl_p99": q[1],
        "kl_max": float(kl.max()),
        "top1_agreement": agree,
        "perplexity": math.exp(nll_model),
        "reference_perplexity": math.exp(nll_ref),
        "kl_per_token": [round(float(v), 6) for v in kl],
    }
