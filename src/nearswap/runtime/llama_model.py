"""A GGUF model run by llama.cpp itself: load, tokenize, decode, logits, with one KV cache kept
between calls so that a request sharing a prefix with the last one decodes only what differs.

This is what llama.cpp computes — its quantized matrix products and activations — not the
dequantized weights run by torch. One sequence, one context: the judge scores requests one
after another, ordered so that neighbours share their prefix (docs/judging.md).
"""

from __future__ import annotations

import ctypes as C
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..core import llamacpp
from ..core.errors import NearswapError, shown
from ..core.paths import default_threads
from ..core.tokens import common_prefix

BATCH = 512  # tokens decoded in one llama_decode call (llama.cpp's default micro-batch)
SEQUENCES = 4  # requests scored side by side in one call, each its own sequence over the shared prefix
# (kept small: on a 2-core CPU a small model is compute-bound and batching does not pay; docs/judging.md)


class LlamaModel:
    """One GGUF in llama.cpp: ``decode`` appends tokens to the cached sequence and returns the
    logits of the positions asked for; ``keep(n)`` cuts the sequence back to its first n tokens.
    llama.cpp's defaults (what its users run: flash attention where it can, an F16 KV cache), or
    with ``exact`` plain attention on an F32 cache, as transformers computes (the defaults'
    flash attention rounds queries and keys to F16; the figures: docs/judging.md)."""

    def __init__(self, path: str | Path, n_ctx: int | None = None, threads: int | None = None,
                 batch: int = BATCH, exact: bool = False) -> None:
        self.path = Path(path)
        lib = self.lib = llamacpp.required(f"running {self.path.name} in llama.cpp")
        if not self.path.is_file():
            raise NearswapError(f"{self.path}: no such GGUF file")
        since = llamacpp.mark()
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(os.fsencode(self.path), mp)
        if not self.model:
            reason = llamacpp.last_error(since)
            raise NearswapError(f"{self.path}: llama.cpp cannot load it ({reason or 'no reason logged'}); "
                                "check it with `nearswap inspect` or convert it again")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self.model))
        cp = lib.llama_context_default_params()
        cp.n_ctx = min(n_ctx or self.n_ctx_train, self.n_ctx_train) if self.n_ctx_train > 0 else (n_ctx or 2048)
        self.batch_size = min(batch, cp.n_ctx)  # llama.cpp caps a batch at the context (and asserts it)
        cp.n_batch = cp.n_ubatch = self.batch_size
        cp.n_threads = cp.n_threads_batch = threads or default_threads()
        cp.no_perf = True
        cp.n_seq_max = SEQUENCES
        cp.kv_unified = True  # one cache for every sequence: a shared prefix is held once, copied by reference
        if exact:
            cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
            cp.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            reason = llamacpp.last_error(since)
            lib.llama_model_free(self.model)
            self.model = None
            raise NearswapError(f"{self.path}: llama.cpp cannot make a context of {cp.n_ctx} tokens for it "
                                f"({reason or 'no reason logged'})")
        self.n_ctx = int(lib.llama_n_ctx(self.ctx))
        self.memory = lib.llama_get_memory(self.ctx)
        self._batch = lib.llama_batch_init(self.batch_size, 0, 1)
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds, from position 0

    # --- vocabulary ---
    @property
    def bos(self) -> int:
        return int(self.lib.llama_vocab_bos(self.vocab))

    @property
    def eos(self) -> int:
        return int(self.lib.llama_vocab_eos(self.vocab))

    @property
    def adds_bos(self) -> bool:
        return bool(self.lib.llama_vocab_get_add_bos(self.vocab))

    def is_end(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """llama.cpp's tokens of ``text`` (special tokens in it read as text, not as controls)."""
        raw = text.encode("utf-8")
        room = len(raw) + 8
        while True:
            out = (C.c_int32 * room)()
            n = self.lib.llama_tokenize(self.vocab, raw, len(raw), out, room, add_special, False)
            if n >= 0:
                return list(out[:n])
            room = -n

    def piece(self, token: int) -> bytes:
        buf = C.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = C.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    # --- decoding ---
    def keep(self, n: int) -> None:
        """Cut the cached sequence back to its first ``n`` tokens."""
        if n < len(self.cached):
            if n == 0:
                self.lib.llama_memory_clear(self.memory, True)
            elif not self.lib.llama_memory_seq_rm(self.memory, 0, n, -1):
                self.lib.llama_memory_clear(self.memory, True)
                n = 0
            self.cached = self.cached[:n]

    def common_prefix(self, tokens: Sequence[int]) -> int:
        return common_prefix(self.cached, tokens)

    def decode(self, tokens: Sequence[int], wanted: Sequence[int] = ()) -> np.ndarray:
        """Append ``tokens`` to the cached sequence; the logits after each position in
        ``wanted`` (indices into ``tokens``), float32 ``[len(wanted), n_vocab]``."""
        if len(self.cached) + len(tokens) > self.n_ctx:
            raise NearswapError(f"{self.path.name}: {len(self.cached) + len(tokens)} tokens do not fit llama.cpp's "
                                f"context of {self.n_ctx}")
        out = np.empty((len(wanted), self.n_vocab), np.float32)
        want = {w: k for k, w in enumerate(wanted)}
        b = self._batch
        since = llamacpp.mark()
        start = 0
        while start < len(tokens):
            part = tokens[start:start + self.batch_size]
            base = len(self.cached)
            rows = []
            for i, tok in enumerate(part):
                b.token[i] = tok
                b.pos[i] = base + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                k = want.get(start + i)
                b.logits[i] = 1 if k is not None else 0
                if k is not None:
                    rows.append((i, k))
            b.n_tokens = len(part)
            rc = self.lib.llama_decode(self.ctx, b)
            if rc != 0:
                self.keep(base)
                raise NearswapError(f"{self.path.name}: llama.cpp's decode failed (code {rc}: "
                                    f"{llamacpp.last_error(since) or 'no reason logged'})")
            self.cached.extend(int(t) for t in part)
            for i, k in rows:
                out[k] = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
            start += len(part)
        return out

    def logits_from(self, tokens: Sequence[int], first: int) -> np.ndarray:
        """The logits after every position from ``first`` to the end of ``tokens`` (a whole
        sequence from position 0), decoding only what the cache does not already hold."""
        keep = min(self.common_prefix(tokens), first)
        self.keep(keep)
        return self.decode(tokens[keep:], range(first - keep, len(tokens) - keep))

    def greedy(self, ids: Sequence[int], limit: int, until: Sequence[str] = ()) -> str:
        """The greedy continuation of ``ids`` (at most ``limit`` tokens), cut before the first
        stop string in ``until``."""
        logits = self.logits_from(ids, len(ids) - 1)[-1]
        made: list[int] = []
        for _ in range(limit):
            token = int(logits.argmax())
            if self.is_end(token):
                break
            made.append(token)
            if until and any(s and s in self.detokenize(made) for s in until):
                break
            logits = self.decode([token], [0])[0]
        text = self.detokenize(made)
        for s in until:
            if s and s in text:
                text = text.split(s)[0]
        return text

    def score_many(self, requests: Sequence[tuple[Sequence[int], int]]) -> Iterator[tuple[int, np.ndarray]]:
        """``logits_from`` for many requests, batched: (index, logits) in the order given.
        Neighbours (give them sorted by their tokens) share a prefix: it is decoded once into
        sequence 0 (or kept from the last call), each request's rest goes into a sequence of its
        own that starts from that prefix, and up to ``SEQUENCES`` rests are decoded together in
        one ``llama_decode`` — the weights read once for all of them."""
        i = 0
        while i < len(requests):
            chunk = [i]
            prefix = common_prefix(requests[i][0], requests[i][0], requests[i][1])
            rest = len(requests[i][0]) - prefix
            while i + len(chunk) < len(requests) and len(chunk) < SEQUENCES - 1:
                tokens, first = requests[i + len(chunk)]
                p = min(common_prefix(requests[i][0], tokens, first), prefix)
                extra = rest + (prefix - p) * len(chunk) + len(tokens) - p
                if extra > self.batch_size or p + extra > self.n_ctx:
                    break
                chunk.append(i + len(chunk))
                prefix, rest = p, extra
            i += len(chunk)
            yield from self._score_chunk(requests, chunk, prefix)

    def _score_chunk(self, requests: Sequence[tuple[Sequence[int], int]], chunk: list[int],
                     prefix: int) -> Iterator[tuple[int, np.ndarray]]:
        tokens0 = requests[chunk[0]][0]
        keep = min(self.common_prefix(tokens0), prefix)
        self.keep(keep)
        if prefix > keep:
            self.decode(tokens0[keep:prefix])
        if len(self.cached) + sum(len(requests[j][0]) - prefix for j in chunk) > self.n_ctx:
            raise NearswapError(f"{self.path.name}: the requests do not fit llama.cpp's context of {self.n_ctx}")
        b, lib = self._batch, self.lib
        since = llamacpp.mark()
        # every token of every rest: (sequence, position, token, index into its logits or -1)
        items = []
        for s, j in enumerate(chunk, 1):
            tokens, first = requests[j]
            lib.llama_memory_seq_cp(self.memory, 0, s, 0, prefix)
            items += [(s, q, int(tokens[q]), q - first if q >= first else -1) for q in range(prefix, len(tokens))]
        out = {j: np.empty((len(requests[j][0]) - requests[j][1], self.n_vocab), np.float32) for j in chunk}
        try:
            for start in range(0, len(items), self.batch_size):
                part = items[start:start + self.batch_size]
                for k, (s, q, tok, row) in enumerate(part):
                    b.token[k], b.pos[k], b.n_seq_id[k], b.seq_id[k][0] = tok, q, 1, s
                    b.logits[k] = 1 if row >= 0 else 0
                b.n_tokens = len(part)
                rc = lib.llama_decode(self.ctx, b)
                if rc != 0:
                    raise NearswapError(f"{self.path.name}: llama.cpp's decode failed (code {rc}: "
                                        f"{llamacpp.last_error(since) or 'no reason logged'})")
                for k, (s, q, tok, row) in enumerate(part):
                    if row >= 0:
                        out[chunk[s - 1]][row] = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, k),
                                                                        shape=(self.n_vocab,))
        finally:
            for s in range(1, len(chunk) + 1):
                lib.llama_memory_seq_rm(self.memory, s, -1, -1)
        for j in chunk:
            yield j, out[j]

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self._batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "LlamaModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"LlamaModel({shown(str(self.path))})"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of float32 logits, row by row."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x
