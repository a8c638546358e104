"""AWQ quants (the card's AWQ row), made by llm-compressor, written as compressed-tensors.

AutoAWQ is deprecated; its successor is llm-compressor's ``AWQModifier``: activation-aware
scales searched on calibration text, then weights rounded to ``bits`` in groups of
``group_size`` columns (asymmetric, the usual W4A16 AWQ). The result is a compressed-tensors
checkpoint that transformers (with the ``compressed-tensors`` package) and vLLM load.

``preflight`` checks everything it can before torch is imported: the source (an HF
directory), the group size against every linear layer's columns (SmolLM2's 576 is no
multiple of 128: say so, and which size fits), the calibration text, the library. The
output is written atomically like every nearswap output, with the calibration recorded.

Runs on CPU (measured on SmolLM2-135M in docs/benchmarks.md). llm-compressor 0.14 pins its
intermediate activations in page-locked memory for faster host-to-GPU copies, which torch
refuses without an accelerator; with no GPU that pinning is skipped (it changes no value).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..core.errors import NearswapError
from ..core.files import read_json_object, read_text

GROUP_SIZES = (128, 64, 32)
INSTALL = "pip install 'nearswap[awq]' (in a virtual environment of its own: llm-compressor pins transformers)"


def _columns(config: dict) -> dict[str, int]:
    """The input widths of a decoder's linear layers, from its config."""
    hidden = config.get("hidden_size")
    inter = config.get("intermediate_size")
    heads, head_dim = config.get("num_attention_heads"), config.get("head_dim")
    if not isinstance(hidden, int) or not isinstance(inter, int):
        raise NearswapError("config.json has no whole-number hidden_size and intermediate_size; "
                            "AWQ is for decoder language models (llama, qwen, mistral, ...)")
    widths = {"hidden_size (q/k/v, gate/up inputs)": hidden, "intermediate_size (down_proj input)": inter}
    if isinstance(heads, int) and isinstance(head_dim, int):
        widths["heads x head_dim (o_proj input)"] = heads * head_dim
    return widths


def calibration_texts(path: str | Path, samples: int) -> list[str]:
    """Up to ``samples`` passages of a text file: its paragraphs (blank-line separated), or
    its lines when it has no blank lines."""
    text = read_text(path, "--text")
    parts = [p.strip() for p in text.split("\n\n") if p.strip()]
    if len(parts) < 2:
        parts = [line.strip() for line in text.splitlines() if line.strip()]
    if not parts:
        raise NearswapError(f"--text {path} is empty; give a text file of calibration passages")
    return parts[:samples]


def preflight(source: str | Path, text: str | Path | None, bits: int, group_size: int, samples: int) -> list[str]:
    """Check everything but the quantization itself; returns the calibration passages."""
    source = Path(source)
    if not (source.is_dir() and (source / "config.json").is_file()):
        raise NearswapError(f"{source}: AWQ is made from an HF model directory; convert a GGUF first "
                            f"(nearswap convert {source.name} -o {source.stem}-hf)")
    if bits not in (4, 8):
        raise NearswapError(f"--bits {bits}: AWQ here writes 4 or 8 bits per weight (4 is AWQ's usual)")
    if text is None:
        raise NearswapError("--format awq needs calibration text: --text FILE (passages separated by blank lines, "
                            "e.g. text like what the model will read)")
    config = read_json_object(source / "config.json", "config.json")
    bad = {what: n for what, n in _columns(config).items() if n % group_size}
    if bad:
        what, n = next(iter(bad.items()))
        fits = [g for g in GROUP_SIZES if all(m % g == 0 for m in _columns(config).values())]
        hint = f"pass --group-size {fits[0]}" if fits else "no common group size fits; this model cannot be grouped so"
        raise NearswapError(f"{source}: {what} is {n}, not a multiple of --group-size {group_size}; {hint}")
    passages = calibration_texts(text, samples)
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        raise NearswapError(f"--format awq needs llm-compressor: {INSTALL}") from None
    return passages


def export_awq(source: str | Path, out: str | Path, text: str | Path | None, *, bits: int = 4, group_size: int = 128,
               samples: int = 64, seq_len: int = 256, force: bool = False) -> dict[str, Any]:
    """Quantize ``source`` (an HF directory) with AWQ into the directory ``out``."""
    from ..runtime.output import atomic_directory

    passages = preflight(source, text, bits, group_size, samples)
    out = Path(out)
    with atomic_directory(out, force) as tmp:
        started = time.perf_counter()
        _run(Path(source), tmp, passages, bits, group_size, seq_len)
        seconds = time.perf_counter() - started
        result = {"format": "awq", "bits": bits, "group_size": group_size, "symmetric": False,
                  "calibration": {"text": str(text), "passages": len(passages), "max_tokens": seq_len},
                  "seconds": round(seconds, 1), "out": str(out)}
        (tmp / "nearswap_awq.json").write_text(json.dumps(result, indent=1) + "\n")
    result["bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return result


def _run(source: Path, dest: Path, passages: list[str], bits: int, group_size: int, seq_len: int) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # (module docstring)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype="auto")
    data = Dataset.from_dict({"text": passages}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=seq_len), batched=True,
        remove_columns=["text"])
    scheme = {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": False,
                                                 "strategy": "group", "group_size": group_size}}
    recipe = [AWQModifier(duo_scaling="both"),  # the scales searched, then the weights rounded with them
              QuantizationModifier(ignore=["lm_head"], config_groups={"group_0": scheme})]
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=seq_len, num_calibration_samples=len(passages),
            shuffle_calibration_samples=False)
    model.save_pretrained(str(dest), save_compressed=True)
    tokenizer.save_pretrained(str(dest))
