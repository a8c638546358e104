"""How a model writes: seeded stories, and the scores a reader would notice first.

The model card's quality claim is about writing: a storyteller that "did not often use
cliches such as 'In the end', 'And so', 'beacon of hope'". nearswap lets every model write
the same stories (fixed prompts, fixed seeds, fixed length) and scores them:

- **clichés per 1,000 words** against ``CLICHES`` (or the user's list): a phrase matches a run
  of consecutive words, case and punctuation ignored, never across a sentence end (``. ! ?
  ; :`` or a line break); overlapping matches all count ("and so and so" holds "and so" twice);
- **distinct-2 / distinct-3**: distinct word n-grams / all word n-grams (loops drive them down);
- **longest repeat**: the longest run of words that occurs twice (a loop's length);
- **non-dictionary share**: words that are not a whole-word token of the reference
  tokenizer (word salad drives it up), as ``sweep`` computes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..core.errors import NearswapError

PROMPTS = (
    "Once upon a time, in a small village by the sea, there lived",
    "The storm had been raging for three days when the stranger knocked at the door.",
    "Nobody in the city remembered the last time the old clock tower had chimed, until tonight.",
    "She opened the letter slowly, already knowing what it would say.",
)
SEEDS = (0, 1)
NEW_TOKENS = 120

# phrase -> where it comes from
CLICHES: dict[str, str] = {
    "in the end": "QuartetAnemoi-70B model card",
    "and so": "QuartetAnemoi-70B model card",
    "beacon of hope": "QuartetAnemoi-70B model card",
    "a testament to": "AntiSlop sampler README (sam-paech/antislop-sampler): 'no more testaments or tapestries'",
    "tapestry of": "AntiSlop sampler README (sam-paech/antislop-sampler): 'no more testaments or tapestries'",
    "little did": "nearswap's choice: a stock phrase of model-written fiction",
    "a sense of": "nearswap's choice: a stock phrase of model-written fiction",
    "sent shivers down": "nearswap's choice: a stock phrase of model-written fiction",
    "barely above a whisper": "nearswap's choice: a stock phrase of model-written fiction",
    "the air was thick with": "nearswap's choice: a stock phrase of model-written fiction",
    "couldn't help but": "nearswap's choice: a stock phrase of model-written fiction",
    "deep breath": "nearswap's choice: a stock phrase of model-written fiction",
    "a mix of": "nearswap's choice: a stock phrase of model-written fiction",
    "for the first time in": "nearswap's choice: a stock phrase of model-written fiction",
    "from that day on": "nearswap's choice: a stock phrase of model-written fiction",
    "happily ever after": "nearswap's choice: a stock phrase of model-written fiction",
}

WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # letters and digits, inner apostrophes kept
SENTENCE_END = re.compile(r"[.!?;:\n]+")


def words(text: str) -> list[str]:
    """Lower-case words; curly apostrophes as straight ones."""
    return [w.lower().replace("’", "'") for w in WORD.findall(text)]


def load_cliches(path: str | Path) -> dict[str, str]:
    """A user's phrase list: one phrase per line (``#`` starts a comment; text after a tab is
    its source)."""
    from ..core.files import read_bytes

    raw = read_bytes(path, 1 << 20, "--cliches")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NearswapError(f"--cliches {path}: not UTF-8 text") from None
    phrases: dict[str, str] = {}
    for line in text.splitlines():
        phrase, _, source = line.split("#", 1)[0].partition("\t")
        key = " ".join(words(phrase))
        if key:
            phrases[key] = source.strip() or f"{Path(path).name}"
    if not phrases:
        raise NearswapError(f"--cliches {path}: no phrases in it (one phrase per line)")
    return phrases


def cliche_counts(text: str, phrases: Iterable[str]) -> dict[str, int]:
    """Occurrences of each phrase (as words) within sentences, overlaps included."""
    sentences = [words(s) for s in SENTENCE_END.split(text)]
    counts = {}
    for phrase in phrases:
        target = words(phrase)
        k = len(target)
        counts[phrase] = sum(1 for ws in sentences for i in range(len(ws) - k + 1) if ws[i:i + k] == target) if k else 0
    return counts


def vocabulary_words(tokenizer: Any) -> set[str]:
    """Lower-case words that are whole tokens of the tokenizer's vocabulary (BPE 'Ġword' or
    'word'): what ``nondict`` counts a word against."""
    from ..runtime.llama_model import LlamaModel

    if isinstance(tokenizer, LlamaModel):  # llama.cpp's vocabulary: each token's text, its leading space included
        tokens = (tokenizer.piece(t).decode("utf-8", "replace").replace(" ", "Ġ", 1) for t in range(tokenizer.n_vocab))
    else:
        tokens = iter(tokenizer.get_vocab())
    found = set()
    for token in tokens:
        w = token[1:] if token[:1] in ("Ġ", "▁") else token
        if w.isalpha():
            found.add(w.lower())
    return found


def nondict(ws: Sequence[str], vocabulary: set[str]) -> float:
    """The share of alphabetic words (``words``) that are not words of the vocabulary (word
    salad drives it up); 1.0 for a text without any."""
    alpha = [w for w in ws if w.isalpha()]
    return sum(w not in vocabulary for w in alpha) / len(alpha) if alpha else 1.0


def distinct(ws: Sequence[str], n: int) -> float:
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def longest_repeat(ws: Sequence[str]) -> int:
    """Length in words of the longest word sequence that occurs at least twice (overlaps allowed)."""
    best = 0
    n = len(ws)
    for shift in range(1, n):  # compare the text with itself shifted: the longest common run
        run = 0
        for i in range(n - shift):
            run = run + 1 if ws[i] == ws[i + shift] else 0
            best = max(best, run)
    return best


@dataclass
class Story:
    prompt: str
    seed: int
    text: str


def score(stories: list[Story], phrases: dict[str, str], dictionary: set[str] | None) -> dict[str, Any]:
    """The writing scores of one model's stories (all stories pooled for rates)."""
    texts = [s.text for s in stories]
    all_words = [w for t in texts for w in words(t)]
    counts: dict[str, int] = {p: 0 for p in phrases}
    for t in texts:
        for p, c in cliche_counts(t, phrases).items():
            counts[p] += c
    total = sum(counts.values())
    per_story = [words(t) for t in texts]
    out: dict[str, Any] = {
        "words": len(all_words),
        "cliches": total,
        "cliches_per_1000_words": 1000 * total / len(all_words) if all_words else 0.0,
        "cliche_counts": {p: c for p, c in counts.items() if c},
        "distinct2": _mean([distinct(ws, 2) for ws in per_story]),
        "distinct3": _mean([distinct(ws, 3) for ws in per_story]),
        "longest_repeat": max((longest_repeat(ws) for ws in per_story), default=0),
    }
    if dictionary is not None:
        out["nondict"] = nondict(all_words, dictionary)
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def generate(model: Any, tokenizer: Any, prompts: Sequence[str] = PROMPTS, seeds: Sequence[int] = SEEDS,
             new_tokens: int = NEW_TOKENS, temperature: float = 0.7, top_p: float = 0.95) -> list[Story]:
    """One story per prompt and seed: the prompts of a seed sampled together in one batch
    (left-padded), seeded, so a model writes the same stories on every run. ``model`` may be a
    ``LlamaModel`` (llama.cpp; then ``tokenizer`` is the same): the same prompts, seeds and
    sampling, drawn by numpy from llama.cpp's logits."""
    from ..runtime.llama_model import LlamaModel

    if isinstance(model, LlamaModel):
        return [Story(p, seed, _sample_llama(model, p, seed, new_tokens, temperature, top_p))
                for seed in seeds for p in prompts]
    import torch

    stories = []
    side = tokenizer.padding_side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    try:
        for seed in seeds:
            batch = tokenizer(list(prompts), return_tensors="pt", padding=True) if tokenizer.pad_token_id is not None \
                else _pad_left(tokenizer, prompts, pad)
            torch.manual_seed(seed)
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=True, temperature=temperature,
                                     top_p=top_p, pad_token_id=pad)
            width = batch["input_ids"].shape[1]
            for prompt, row in zip(prompts, out):
                stories.append(Story(prompt, seed, tokenizer.decode(row[width:], skip_special_tokens=True)))
    finally:
        tokenizer.padding_side = side
    return stories


def _sample_llama(m: Any, prompt: str, seed: int, new_tokens: int, temperature: float, top_p: float) -> str:
    """One seeded story from llama.cpp's logits: temperature, then nucleus (top-p) sampling,
    as transformers' sampler orders them."""
    import numpy as np

    from ..runtime.llama_model import log_softmax

    rng = np.random.default_rng(seed)
    ids = m.tokenize(prompt, add_special=m.adds_bos)
    logits = m.logits_from(ids, len(ids) - 1)[-1]
    made: list[int] = []
    for _ in range(new_tokens):
        p = np.exp(log_softmax(logits / temperature))
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        kept = order[: int(np.searchsorted(cum, top_p)) + 1]
        token = int(rng.choice(kept, p=p[kept] / p[kept].sum()))
        if m.is_end(token):
            break
        made.append(token)
        logits = m.decode([token], [0])[0]
    return m.detokenize(made)


def _pad_left(tokenizer: Any, prompts: Sequence[str], pad: int) -> dict[str, Any]:
    import torch

    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    return {"input_ids": ids, "attention_mask": mask}
