"""nearswap's LM for lm-evaluation-harness on llama.cpp: a GGUF scored as llama.cpp computes it.

lm-eval builds the requests from its own task configs and scores the answers (``TemplateLM``
splits context and continuation as every lm-eval backend does); this class only gives it
log-likelihoods and generations from llama.cpp's logits (``runtime.llama_model``). Requests
are taken in token order, so those that share a prefix (the choices of one question, a
few-shot context) are neighbours: the prefix stays in llama.cpp's KV cache and only the rest
is decoded, the rests of a few requests side by side in one call (``LlamaModel.score_many``).
Tokens are llama.cpp's own (the GGUF's vocabulary), BOS as the GGUF says.

What differs from the torch backend is arithmetic: llama.cpp multiplies quantized weights
with activations it quantizes too (Q8 for most types), where torch multiplies the
dequantized weights in float32. On a float GGUF the two agree to the tolerance
docs/judging.md states; on a quant, the difference is what the quant does to the model.
"""

from __future__ import annotations

from typing import Any, Callable

from ..core.errors import NearswapError
from ..runtime.llama_model import LlamaModel, log_softmax

MAX_GEN_TOKS = 256  # lm-eval's HF backend's default


def make_llama_lm(model: LlamaModel, on_progress: Callable[[int, int], None] | None = None) -> Any:
    """An lm-eval LM over a loaded ``LlamaModel``."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class LlamaCppLM(TemplateLM):
        exact_rescored = 0  # (no counterpart of the torch backend's re-scoring: llama.cpp's numbers are the ones reported)
        requests_scored = 0
        input_tokens = 0  # tokens lm-eval's backend would feed for the same requests (one forward each)

        def __init__(self) -> None:
            super().__init__()
            self.m = model

        @property
        def eot_token_id(self) -> int:
            return self.m.eos

        @property
        def prefix_token_id(self) -> int:  # as lm-eval's HF backend: BOS where the vocabulary has one
            return self.m.bos if self.m.bos >= 0 else self.m.eos

        @property
        def max_length(self) -> int:
            return self.m.n_ctx

        @property
        def max_gen_toks(self) -> int:
            return MAX_GEN_TOKS

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            add = self.m.adds_bos if add_special_tokens is None else add_special_tokens
            if add and self.m.bos >= 0:
                bos_text = self.m.detokenize([self.m.bos])
                if bos_text and string.startswith(bos_text):
                    add = False
            return self.m.tokenize(string, add_special=add)

        def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
            return self.m.detokenize(tokens)

        def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                                  **kwargs: Any) -> list[tuple[float, bool]]:
            inputs = []
            for _, context_enc, continuation_enc in requests:
                n = len(context_enc) + len(continuation_enc) - 1
                if n > self.max_length:  # lm-eval's HF backend cuts the context's start off; nearswap refuses
                    raise NearswapError(f"{self.m.path.name}: a request of {n} tokens is longer than the context "
                                        f"of {self.max_length} llama.cpp runs this model with; use tasks with "
                                        f"shorter prompts (fewer shots) or a model with a longer context")
                whole = context_enc + continuation_enc
                inputs.append((whole[:-1], continuation_enc))
            order = sorted(range(len(inputs)), key=lambda i: inputs[i][0])  # neighbours share their prefix
            results: list[tuple[float, bool] | None] = [None] * len(inputs)
            todo = [i for i in order if inputs[i][1]]
            for i in order:
                if not inputs[i][1]:
                    results[i] = (0.0, True)
            scored = self.m.score_many([(inputs[i][0], len(inputs[i][0]) - len(inputs[i][1])) for i in todo])
            for done, (k, logits) in enumerate(scored, 1):
                i = todo[k]
                inp, cont = inputs[i]
                logp = log_softmax(logits)
                picked = logp[range(len(cont)), cont]
                results[i] = (float(picked.sum()), bool((logp.argmax(axis=1) == cont).all()))
                self.input_tokens += len(inp)
                if on_progress:
                    on_progress(done, len(todo))
            self.requests_scored += len(requests)
            return results  # type: ignore[return-value]

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            out = []
            for req in requests:
                windows = map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(req.args[0], add_special_tokens=False),
                    prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1))
                scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
                out.append(sum(s for s, _ in scored))
            return out

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            """Greedy generation (lm-eval's tasks ask for it: do_sample false) up to a stop string."""
            out = []
            for n, req in enumerate(requests, 1):
                context, kwargs = req.args
                kwargs = dict(kwargs or {})
                if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) not in (0, 0.0):
                    raise NearswapError("the llama.cpp backend generates greedily; this task asks to sample "
                                        "(evaluate it with --backend torch)")
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                limit = int(kwargs.get("max_gen_toks", self.max_gen_toks))
                ids = self.tok_encode(context)[-(self.max_length - limit):]
                self.input_tokens += len(ids)
                text = self.m.greedy(ids, limit, until)
                out.append(text)
                if on_progress:
                    on_progress(n, len(requests))
            return out

    return LlamaCppLM()
