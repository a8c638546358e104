"""nearswap's LM for lm-evaluation-harness on a CPU: lm-eval's HF backend, with log-likelihoods
computed in batches — and every decision lm-eval makes from them the same as its own backend's.

On a CPU a forward pass over a few tokens is bound by reading the model's weights, not by
arithmetic, and the choices of one question repeat its whole context. lm-eval's HF backend
scores one request per forward pass; this class packs the requests that share a prefix into
one sequence (the prefix once, a tree-shaped attention mask) and batches those sequences, so
the weights are read once per batch and shared contexts are computed once (figures: docs/benchmarks.md).

Batched arithmetic is not bit-identical to one-at-a-time arithmetic (matrix products and
attention reduce in another order; the log-likelihoods differ in their last digits). Scores are only
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

from ..core.errors import NearswapError
from ..core.tokens import common_prefix

TOKENS_PER_BATCH = 4096  # padded tokens in one forward pass
LOGITS_BYTES = 256 << 20  # the needed logits of one batch
VOCAB_GUESS = 131072  # vocabulary size assumed when sizing batches by their logits (Llama 3's is 128,256)
MAX_BATCH = 64
TIE = 2e-3  # nats: decisions closer than this are recomputed exactly (far above what batching moves: docs/judging.md)


def make_lm(model: Any, tokenizer: Any, threads: int | None = None,
            on_progress: Callable[[int, int], None] | None = None) -> Any:
    """An lm-eval LM for an already loaded (float32, CPU) transformers model and its tokenizer.
    ``on_progress(done, total)`` follows the requests of each call lm-eval makes."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class NearswapLM(HFLM):
        exact_rescored = 0  # documents scored again exactly (see the module docstring)
        requests_scored = 0
        input_tokens = 0  # tokens lm-eval's backend would feed for the same requests (one forward each)

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
            inputs = []
            for _, context_enc, continuation_enc in requests:  # exactly as HFLM builds them
                whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
                inputs.append((whole[:-1], continuation_enc))
            results: list[tuple[float, bool] | None] = [None] * len(inputs)
            margins = [0.0] * len(inputs)
            self.input_tokens += sum(len(inp) for inp, _ in inputs)
            groups = _groups(inputs)
            done = 0
            for batch in _pack(groups):
                self._score_batch(batch, inputs, results, margins)
                done += sum(len(g.members) for g in batch)
                if on_progress:
                    on_progress(done, self._total)
            self._margins.extend(margins)
            return results  # type: ignore[return-value]

        def _score_batch(self, batch: list["_Group"], inputs: list[tuple[list[int], list[int]]],
                         results: list[Any], margins: list[float]) -> None:
            """One forward pass over packed groups: each group's shared prefix once, then each
            member's remainder, attending to the prefix and to itself (a tree mask)."""
            import torch.nn.functional as F

            width = max(g.length for g in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            pos = torch.zeros((len(batch), width), dtype=torch.long)
            seg = torch.full((len(batch), width), -1, dtype=torch.long)  # -1 padding, 0 prefix, k member k
            for row, g in enumerate(batch):
                ids[row, :g.length] = torch.tensor(g.tokens, dtype=torch.long)
                pos[row, :g.length] = torch.tensor(g.positions, dtype=torch.long)
                seg[row, :g.length] = torch.tensor(g.segments, dtype=torch.long)
            q = torch.arange(width)
            sq, sk = seg[:, :, None], seg[:, None, :]
            allowed = (q[None, None, :] <= q[None, :, None]) & (sk >= 0) & ((sk == 0) | (sk == sq))
            allowed |= torch.eye(width, dtype=torch.bool)[None]  # padding attends to itself: no empty rows
            mask = torch.zeros(allowed.shape, dtype=self.model.dtype).masked_fill_(~allowed, torch.finfo(self.model.dtype).min)
            rows, owners = [], []
            for row, g in enumerate(batch):
                for i, where in zip(g.members, g.needed):
                    rows.append(row * width + torch.tensor(where))
                    owners.append(i)
            with torch.inference_mode():
                hidden = self._body(input_ids=ids, attention_mask=mask[:, None], position_ids=pos).last_hidden_state
                flat = hidden.reshape(-1, hidden.shape[-1])
                logits = self._head(flat[torch.cat(rows)])
                start = 0
                for i, r in zip(owners, rows):
                    n = len(r)
                    logp = F.log_softmax(logits[start:start + n], dim=-1)
                    start += n
                    target = torch.tensor(inputs[i][1], dtype=torch.long)
                    picked = logp.gather(1, target[:, None]).squeeze(1)
                    logp[torch.arange(n), target] = float("-inf")
                    gap = picked - logp.max(dim=1).values  # > 0 where the target is the argmax
                    results[i] = (float(picked.sum()), bool((gap > 0).all()))
                    margins[i] = float(gap.abs().min())

        def _head(self, hidden: Any) -> Any:
            logits = self.model.get_output_embeddings()(hidden)
            cap = getattr(self.model.config, "final_logit_softcapping", None)
            if cap:  # Gemma 2/3 cap their logits after the head
                logits = torch.tanh(logits / cap) * cap
            return logits

        @property
        def _body(self) -> Any:
            return getattr(self.model, self.model.base_model_prefix)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            """lm-eval's own generation (one request at a time, as its batch size 1 does), with progress."""
            out = []
            for i, req in enumerate(requests):
                self.input_tokens += len(self.tok_encode(req.args[0]))
                out += super().generate_until([req], disable_tqdm=True)
                if on_progress:
                    on_progress(i + 1, len(requests))
            return out

    from .harness import quiet_libraries

    if threads:
        torch.set_num_threads(threads)
    try:
        with quiet_libraries():
            return NearswapLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu", dtype=torch.float32)
    except (ValueError, TypeError) as e:
        raise NearswapError(f"lm-evaluation-harness could not wrap the model ({type(e).__name__}: {str(e)[:160]})") from None


PACK_TOKENS = 1024  # tokens in one packed group (attention over a packed group costs its length squared)
PACK_GROWTH = 1.25  # ... or at most this much longer than its longest request
MIN_SHARED = 8  # tokens a request must share with a group to join it


class _Group:
    """Requests that share a prefix, packed into one sequence: the prefix once, then each
    member's remainder with positions continuing from the prefix."""

    def __init__(self, first: int, inp: list[int]) -> None:
        self.prefix = list(inp)
        self.rest: dict[int, list[int]] = {first: []}
        self.longest = len(inp)

    def shared_with(self, inp: list[int]) -> int:
        return common_prefix(self.prefix, inp)

    def add(self, i: int, inp: list[int], shared: int) -> None:
        cut = self.prefix[shared:]
        for j in self.rest:
            self.rest[j] = cut + self.rest[j]
        self.prefix = self.prefix[:shared]
        self.rest[i] = list(inp[shared:])
        self.longest = max(self.longest, len(inp))

    def size_with(self, inp: list[int], shared: int) -> int:
        extra = len(self.prefix) - shared
        return shared + sum(len(r) + extra for r in self.rest.values()) + len(inp) - shared

    def finish(self, inputs: list[tuple[list[int], list[int]]]) -> "_Group":
        p = len(self.prefix)
        self.members = list(self.rest)
        self.tokens, self.positions, self.segments, self.needed = list(self.prefix), list(range(p)), [0] * p, []
        for k, i in enumerate(self.members, 1):
            offset = len(self.tokens)
            r = self.rest[i]
            self.tokens += r
            self.positions += range(p, p + len(r))
            self.segments += [k] * len(r)
            inp, cont = inputs[i]
            self.needed.append([q if q < p else offset + q - p for q in range(len(inp) - len(cont), len(inp))])
        self.length = len(self.tokens)
        return self


def _groups(inputs: list[tuple[list[int], list[int]]]) -> list[_Group]:
    """Requests sorted by their tokens, so that those sharing a prefix are neighbours, then
    gathered greedily into groups sharing at least MIN_SHARED tokens, each at most PACK_TOKENS long."""
    order = sorted(range(len(inputs)), key=lambda i: inputs[i][0])
    groups: list[_Group] = []
    current: _Group | None = None
    for i in order:
        inp = inputs[i][0]
        if current is not None:
            shared = current.shared_with(inp)
            size = current.size_with(inp, shared)
            # a group stays short (its attention is quadratic in its length), unless a long shared
            # prefix (a few-shot context) is what makes it long: then members add little to it
            if shared >= MIN_SHARED and (size <= PACK_TOKENS or size <= PACK_GROWTH * max(current.longest, len(inp))):
                current.add(i, inp, shared)
                continue
            groups.append(current.finish(inputs))
        current = _Group(i, inp)
    if current is not None:
        groups.append(current.finish(inputs))
    return groups


def _pack(groups: list[_Group]) -> list[list[_Group]]:
    """Groups, longest first, into batches of at most TOKENS_PER_BATCH padded tokens and
    LOGITS_BYTES of needed logits."""
    groups = sorted(groups, key=lambda g: -g.length)
    batches, current, rows = [], [], 0
    for g in groups:
        need = sum(len(w) for w in g.needed)
        if current and ((len(current) + 1) * current[0].length > TOKENS_PER_BATCH or len(current) >= MAX_BATCH
                        or (rows + need) * VOCAB_GUESS * 4 > LOGITS_BYTES):
            batches.append(current)
            current, rows = [], 0
        current.append(g)
        rows += need
    if current:
        batches.append(current)
    return batches


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
            # acc compares log-likelihoods; acc_norm divides them by the choice's length in
            # characters, which is the continuation's without lm-eval's target delimiter (one
            # space by default): both lengths are tried, so a near tie under either is caught
            scores = (lambda i: results[i][0],
                      lambda i: results[i][0] / max(1, len(requests[i].args[1])),
                      lambda i: results[i][0] / max(1, len(requests[i].args[1]) - 1))
            flagged = False
            for score in scores:
                top = sorted((score(i) for i in members), reverse=True)
                flagged = flagged or top[0] - top[1] < TIE
        if flagged:
            close.extend(members)
    return sorted(close)
