"""The importance matrix of llama.cpp's "iMat" quants, computed on CPU with transformers.

For every linear layer: the sum over calibration tokens of each input column's squared
activation, and the number of tokens (llama.cpp's ``llama-imatrix``: ``in_sum2`` and
``counts``). Its quantizer divides one by the other and weighs each column's rounding error
by the mean it gets, so the weights the text leans on are kept closer.

The calibration text is tokenized once and cut into chunks of ``chunk_tokens`` (llama-imatrix's
``-c``, 512 by default), each run through the model on its own. The file is a GGUF as
llama.cpp's ``common/imatrix-loader.cpp`` reads it: ``general.type = imatrix``,
``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``, and per weight (by its
GGUF name, ``blk.0.attn_q.weight``) ``NAME.in_sum2`` (F32, n_per_row x 1) and ``NAME.counts``
(F32, 1 x 1). ``nearswap export --imatrix FILE`` hands it to llama.cpp's quantizer (``read``:
its per-column importance and the keys llama-quantize records of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..core.errors import NearswapError
from ..core.files import read_text


def weight_names(model: Any, config: dict) -> dict[str, str]:
    """HF linear module name -> the GGUF name of its weight, for every linear layer whose
    weight a GGUF export writes (the head only when it is not tied to the embedding)."""
    import torch

    from ..formats.architectures import BY_HF_CLASS, gguf_name

    arch = BY_HF_CLASS.get((config.get("architectures") or [""])[0])
    if arch is None:
        raise NearswapError(f"an importance matrix is named by GGUF tensor names, and nearswap knows them for "
                            f"{', '.join(sorted(BY_HF_CLASS))}, not {config.get('architectures')}")
    tied = config.get("tie_word_embeddings", False)
    names = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (tied and module_name == "lm_head"):
            continue
        name = gguf_name(arch, module_name + ".weight")
        if name is not None:
            names[module_name] = name
    return names


def compute(model_path: str | Path, text: str | Path, chunk_tokens: int = 512, max_chunks: int | None = None,
            threads: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The sums and counts for ``model_path`` (HF directory or GGUF) over the text file ``text``."""
    from ..judge import models

    content = read_text(text, "--text")  # a bad file is one line before torch is imported
    torch, _ = models.require(lm_eval=False)  # or one line naming the extra to install
    (candidate,) = models.check([model_path], labels=["model"])
    model, tokenizer = models.load(models.hf_directory(candidate), threads)
    config = model.config.to_dict()
    ids = tokenizer(content, add_special_tokens=False, return_tensors="pt").input_ids[0]
    chunks = len(ids) // chunk_tokens
    if max_chunks is not None:
        chunks = min(chunks, max_chunks)
    if chunks < 1:
        raise NearswapError(f"--text {text} holds {len(ids)} tokens, fewer than one chunk of {chunk_tokens}; "
                            "give more text or a smaller --chunk-tokens")
    names = weight_names(model, config)
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def hook(module_name: str) -> Callable[..., None]:
        def record(module: Any, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[module_name] = sums.get(module_name, 0) + (x * x).sum(0)
            counts[module_name] = counts.get(module_name, 0) + x.shape[0]
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in model.named_modules() if name in names]
    try:
        with torch.no_grad():
            for k in range(chunks):
                model(ids[k * chunk_tokens:(k + 1) * chunk_tokens].unsqueeze(0))
                if progress:
                    progress(k + 1, chunks)
    finally:
        for h in handles:
            h.remove()
    return {"names": names, "sums": {n: s.numpy() for n, s in sums.items()}, "counts": counts,
            "chunks": chunks, "chunk_tokens": chunk_tokens, "dataset": Path(text).name}


def write(result: dict[str, Any], out: str | Path, force: bool = False) -> Path:
    """The importance matrix as llama.cpp's GGUF imatrix file, written atomically."""
    import gguf
    import numpy as np

    from ..runtime.output import atomic_file

    out = Path(out)
    with atomic_file(out, force) as part:
        w = gguf.GGUFWriter(str(part), arch="imatrix")  # (general.architecture is not read back)
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(gguf.Keys.IMatrix.DATASETS, [result["dataset"]])
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, result["chunks"])
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, result["chunk_tokens"])
        for module_name in sorted(result["sums"], key=lambda n: result["names"][n]):
            name = result["names"][module_name]
            w.add_tensor(name + ".in_sum2", np.asarray(result["sums"][module_name], np.float32).reshape(1, -1))
            w.add_tensor(name + ".counts", np.array([[result["counts"][module_name]]], np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


@dataclass(frozen=True)
class Matrix:
    """An importance matrix file, read and checked: GGUF name -> (sums, counts) of each weight,
    and the keys llama-quantize writes into a quant made with it (``quantize.imatrix.*``)."""

    path: Path
    entries: dict[str, tuple[Any, Any]]
    records: dict[str, int | str]


def read(path: str | Path) -> Matrix:
    """An imatrix file, checked as llama.cpp's loader checks it."""
    import struct

    import gguf

    if not Path(path).is_file():
        raise NearswapError(f"--imatrix {path}: no such file; make one with `nearswap imatrix MODEL --text FILE -o {path}`")
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError, IndexError, KeyError, struct.error) as e:
        raise NearswapError(f"--imatrix {path}: not a GGUF file ({e.__class__.__name__}: {str(e)[:120]})") from None
    kind = reader.fields.get(gguf.Keys.General.TYPE)
    if kind is None or bytes(kind.parts[-1]).decode() != gguf.GGUFType.IMATRIX:
        raise NearswapError(f"--imatrix {path}: a GGUF but not an importance matrix (general.type is not 'imatrix'); "
                            "make one with `nearswap imatrix MODEL --text FILE -o imatrix.gguf`")
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name, t in tensors.items():
        if name.endswith(".in_sum2"):
            base = name[: -len(".in_sum2")]
            counts = tensors.get(base + ".counts")
            if counts is None or t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise NearswapError(f"--imatrix {path}: {base} has no F32 sums and counts pair; the file is damaged")
            out[base] = (t.data.reshape(-1), counts.data.reshape(-1))
    records: dict[str, int | str] = {"quantize.imatrix.file": str(path)}  # (as llama-quantize writes them)
    datasets = reader.fields.get(gguf.Keys.IMatrix.DATASETS)
    if datasets is not None and datasets.data:
        records["quantize.imatrix.dataset"] = bytes(datasets.parts[datasets.data[0]]).decode("utf-8", "replace")
    records["quantize.imatrix.entries_count"] = len(out)
    chunks = reader.fields.get(gguf.Keys.IMatrix.CHUNK_COUNT)
    if chunks is not None:
        records["quantize.imatrix.chunks_count"] = int(chunks.parts[-1][0])
    return Matrix(Path(path), out, records)


def importance(entries: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """Per-column importance of each tensor, as llama.cpp's quantizer takes it: an entry's sums
    over its count (per expert: ``counts`` holds one count per expert), 1 where nothing was
    counted — what llama-quantize computes from the same file before it quantizes."""
    import numpy as np

    out = {}
    for name, (sums, counts) in entries.items():
        sums = np.asarray(sums, np.float32).reshape(len(counts), -1)
        counts = np.asarray(counts, np.float32).reshape(-1, 1)
        out[name] = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), np.float32(1)).reshape(-1)
    return out
