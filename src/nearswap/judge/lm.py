"""nearswap's LM for lm-evaluation-harness on a CPU: lm-eval's HF backend, with log-likelihoods
computed in batches — and every decision lm-eval makes from them the same as its own backend's.

On a CPU a forward pass of a small model is bound by reading its weights, not by arithmetic:
SmolLM2-135M takes ~70 ms for 1 token and ~140 ms for 30 (the 540 MB of float32 weights are
streamed either way). lm-eval's HF backend scores one request per forward pass; this class
packs requests of similar length into batches of a few thousand tokens (right-padded, sorted
by length), so the weights are read once per batch.

Batched arithmetic is not bit-identical to one-at-a-time arithmetic (matrix products and
attention reduce in another order; the log-likelihoods differ by ~1e-5). Scores are only
compared with each other, so what must not change is every comparison lm-eval makes: which
choice has the highest log-likelihood (``acc``), the highest per-character log-likelihood
(``acc_norm``), and whether the continuation is the greedy one (``is_greedy``). After the
batched pass, every document whose decision is closer than ``TIE`` to flipping is scored
again exactly as lm-eval's backend scores it (one unpadded request per forward pass, the
full vocabulary's log-softmax): its numbers, and so its decisions, are then lm-eval's own.
Everything else (tokenization, truncation, generation) is lm-eval's ``HFLM``, inherited.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

from ..errors import NearswapError

TOKENS_PER_BATCH = 4096  # padded tokens in one forward pass
LOGITS_BYTES = 256 << 20  # the kept logits of one batch
MAX_BATCH = 64
TIE = 2e-3  # nats: decisions closer than this are recomputed exactly (batching moves them by ~1e-5)


def make_lm(model: Any, tokenizer: Any, threads: int | None = None,
            on_progress: Callable[[int, int], None] | None = None) -> Any:
    """An lm-eval LM for an already loaded (float32, CPU) transformers model and its tokenizer.
    ``on_progress(done, total)`` follows the requests of each call lm-eval makes."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class NearswapLM(HFLM):
        exact_rescored = 0  # documents scored again exactly (see the module docstring)
        requests_scored = 0

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            self._margins: list[float] = []
            self._total = len(requests)
            results = super().loglikelihood(requests, disable_tqdm=True)
            margins = self._margins
            close = _close_documents(requests, results, margins)
            if close:
                again = [requests[i] for i in close]
                self._exact = True
                try:
                    exact = super().loglikelihood(again, disable_tqdm=True)
                finally:
                    self._exact = False
                for i, r in zip(close, exact):
                    results[i] = r
                self.exact_rescored += len({(requests[i].task_name, requests[i].doc_id) for i in close})
            self.requests_scored += len(requests)
            return results

        def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> list[tuple[float, bool]]:
            if getattr(self, "_exact", False) or self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=1)
            return self._batched(requests)

        def _batched(self, requests: list[Any]) -> list[tuple[float, bool]]:
            import torch.nn.functional as F

            inputs = []
            for _, context_enc, continuation_enc in requests:  # exactly as HFLM builds them
                whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
                inputs.append((whole[:-1], continuation_enc))
            order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
            results: list[tuple[float, bool] | None] = [None] * len(inputs)
            margins = [0.0] * len(inputs)
            vocab = self.model.config.vocab_size
            start = 0
            while start < len(order):
                batch = _next_batch(order, start, inputs, vocab)
                start += len(batch)
                longest = len(inputs[batch[0]][0])
                # logits only for the trailing positions that hold some request's continuation
                keep = longest - min(len(inputs[i][0]) - len(inputs[i][1]) for i in batch)
                ids = torch.zeros((len(batch), longest), dtype=torch.long)
                mask = torch.zeros((len(batch), longest), dtype=torch.long)
                for row, i in enumerate(batch):
                    inp = inputs[i][0]
                    ids[row, :len(inp)] = torch.tensor(inp, dtype=torch.long)
                    mask[row, :len(inp)] = 1
                with torch.inference_mode():
                    logits = self.model(ids, attention_mask=mask, logits_to_keep=keep).logits
                    for row, i in enumerate(batch):
                        inp, cont = inputs[i]
                        n = len(cont)
                        first = keep - (longest - len(inp)) - n  # row of the first continuation token
                        logp = F.log_softmax(logits[row, first:first + n], dim=-1)
                        target = torch.tensor(cont, dtype=torch.long)
                        picked = logp.gather(1, target[:, None]).squeeze(1)
                        logp[torch.arange(n), target] = float("-inf")
                        gap = picked - logp.max(dim=1).values  # > 0 where the target is the argmax
                        results[i] = (float(picked.sum()), bool((gap > 0).all()))
                        margins[i] = float(gap.abs().min())
                if on_progress:
                    on_progress(start, self._total)
            self._margins.extend(margins)
            return results  # type: ignore[return-value]

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            """lm-eval's own generation (one request at a time, as its batch size 1 does), with progress."""
            out = []
            for i, req in enumerate(requests):
                out += super().generate_until([req], disable_tqdm=True)
                if on_progress:
                    on_progress(i + 1, len(requests))
            return out

    if threads:
        torch.set_num_threads(threads)
    try:
        return NearswapLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu", dtype=torch.float32)
    except (ValueError, TypeError) as e:
        raise NearswapError(f"lm-evaluation-harness could not wrap the model ({type(e).__name__}: {str(e)[:160]})") from None


def _next_batch(order: list[int], start: int, inputs: list[tuple[list[int], list[int]]], vocab: int) -> list[int]:
    """The next requests (longest first) that fit TOKENS_PER_BATCH padded tokens, MAX_BATCH
    requests, and LOGITS_BYTES of kept logits."""
    longest = len(inputs[order[start]][0])
    batch = [order[start]]
    min_ctx = len(inputs[order[start]][0]) - len(inputs[order[start]][1])
    for i in order[start + 1:start + MAX_BATCH]:
        ctx = min(min_ctx, len(inputs[i][0]) - len(inputs[i][1]))
        rows = len(batch) + 1
        if rows * longest > TOKENS_PER_BATCH or rows * (longest - ctx) * vocab * 4 > LOGITS_BYTES:
            break
        batch.append(i)
        min_ctx = ctx
    return batch


def _close_documents(requests: list[Any], results: list[tuple[float, bool]], margins: list[float]) -> list[int]:
    """Indices of the requests whose document's decision is within TIE of flipping: for a
    document of several requests (choices), its two best by log-likelihood or by
    log-likelihood per character; for a single request, its greedy check."""
    docs: dict[tuple[Any, Any], list[int]] = defaultdict(list)
    for i, req in enumerate(requests):
        docs[(req.task_name, req.doc_id)].append(i)
    close = []
    for members in docs.values():
        if len(members) == 1:
            flagged = margins[members[0]] < TIE
        else:
            flagged = False
            for score in (lambda i: results[i][0], lambda i: results[i][0] / max(1, len(requests[i].args[1]))):
                top = sorted((score(i) for i in members), reverse=True)
                flagged = flagged or top[0] - top[1] < TIE
        if flagged:
            close.extend(members)
    return sorted(close)
