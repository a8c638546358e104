"""Where a model comes from and under what terms, as its own files say: the front matter of
its model card (``README.md``), a GGUF's ``general.*`` metadata, the Hugging Face cache path
it sits in. Read for the card of a merge, which inherits every input's terms. Nothing here
touches the network.

A merge's license is the most restrictive of its inputs' (``combine``), by the ranks below;
when the inputs disagree, or one says nothing, the card says so rather than pick a license.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

MAX_CARD = 1 << 20  # bytes of a model card read for its front matter

# How much a license restricts a merge made from the model, least first. A model card's
# `license:` is one of the Hugging Face Hub's ids, or free text (then `other` + a name).
PERMISSIVE, SHARE_ALIKE, USE_RESTRICTED, NO_COMMERCIAL_OR_DERIVATIVES, UNKNOWN = range(5)
RANK_NAMES = {PERMISSIVE: "permissive", SHARE_ALIKE: "share-alike", USE_RESTRICTED: "with use restrictions",
              NO_COMMERCIAL_OR_DERIVATIVES: "non-commercial or no-derivatives", UNKNOWN: "unknown"}
RANKS: dict[str, int] = {
    **dict.fromkeys(("apache-2.0", "mit", "bsd", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "isc", "zlib",
                     "unlicense", "cc0-1.0", "pddl", "wtfpl", "bsl-1.0", "afl-3.0", "ecl-2.0", "ncsa", "postgresql",
                     "cc", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "odc-by", "cdla-permissive-1.0",
                     "cdla-permissive-2.0", "artistic-2.0", "ms-pl", "etalab-2.0"), PERMISSIVE),
    **dict.fromkeys(("cc-by-sa-3.0", "cc-by-sa-4.0", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0",
                     "lgpl-lr", "agpl-3.0", "mpl-2.0", "epl-1.0", "epl-2.0", "eupl-1.1", "osl-3.0", "gfdl", "odbl",
                     "cdla-sharing-1.0", "ofl-1.1", "lppl-1.3c"), SHARE_ALIKE),
    **dict.fromkeys(("openrail", "openrail++", "bigscience-openrail-m", "creativeml-openrail-m",
                     "bigscience-bloom-rail-1.0", "bigcode-openrail-m", "llama2", "llama3", "llama3.1", "llama3.2",
                     "llama3.3", "gemma", "deepfloyd-if-license", "c-uda", "apple-ascl", "other"), USE_RESTRICTED),
    **dict.fromkeys(("cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0",
                     "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0"),
                    NO_COMMERCIAL_OR_DERIVATIVES),
    "unknown": UNKNOWN,
}
# free-text licenses: words that put them in a rank (checked most restrictive first)
TEXT_RANKS = ((re.compile(r"non-?commercial|research (use )?only|\bnc\b|no-?derivatives", re.I),
               NO_COMMERCIAL_OR_DERIVATIVES),)


@dataclass(frozen=True)
class Origin:
    """One input of a merge: what it is called and what its files say about its terms."""

    path: str
    id: str  # its one name everywhere: the folder's or file's name as given (``formats.identity.name_of``)
    license: str | None  # as its files give it (a Hub license id, or free text); None: they say nothing
    found_in: str = ""  # where the license was read
    hub_id: str | None = None  # its Hugging Face Hub id (org/name), when the user or its files say one
    hub_from: str = ""  # where the Hub id was found


def rank(license: str | None) -> int:
    if license is None:
        return UNKNOWN
    key = license.strip().lower()
    if key in RANKS:
        return RANKS[key]
    for pattern, value in TEXT_RANKS:
        if pattern.search(key):
            return value
    return USE_RESTRICTED  # a custom license: its own terms, whatever they are


def origin_of(path: str | Path, hub_id: str | None = None) -> Origin:
    """What ``path`` (an HF directory, a safetensors file or a GGUF) says about itself; ``hub_id``:
    its Hub id as the user gave it (a recipe's ``base_id`` / a step's ``id``), which wins."""
    from ..formats.identity import name_of

    path = Path(path)
    name = name_of(path)
    given = (hub_id, "the recipe") if hub_id else (None, "")
    if path.is_file() and path.suffix.lower() == ".gguf":
        origin = _gguf_origin(path, name)
        found = (origin.hub_id, origin.hub_from)
    else:
        card = path / "README.md" if path.is_dir() else path.parent / "README.md"
        meta = front_matter(card)
        license = meta.get("license")
        if license == "other" and isinstance(meta.get("license_name"), str):
            license = meta["license_name"]
        origin = Origin(str(path), name, license if isinstance(license, str) else None,
                        f"{card.name}" if isinstance(license, str) else "")
        found = _hub_id_of_directory(path)
    cached = _hub_id_from_cache_path(path)
    hub, where = given if given[0] else (cached, "its Hugging Face cache path") if cached else found
    return dataclasses.replace(origin, hub_id=hub, hub_from=where if hub else "")


def _hub_id_of_directory(path: Path) -> tuple[str | None, str]:
    """The Hub id a model directory's config.json names (``_name_or_path``, as transformers
    writes the id it was loaded from), when that is a Hub id and not a local path."""
    from ..core.errors import NearswapError
    from ..core.files import read_json_object
    from ..merging.recipe import HUB_ID

    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        return None, ""
    try:
        value = read_json_object(config, "config").get("_name_or_path")
    except (NearswapError, OSError, AttributeError):
        return None, ""
    if isinstance(value, str) and HUB_ID.fullmatch(value) and "--" not in value and ".." not in value \
            and not value.startswith((".", "/", "~")):
        return value, "config.json _name_or_path"
    return None, ""


def front_matter(card: Path) -> dict[str, Any]:
    """The YAML front matter of a model card (``---`` lines around it), or {} when there is
    none or it cannot be read (a card is a courtesy: its absence is not an error)."""
    import yaml

    from ..core.errors import NearswapError
    from ..core.files import read_bytes
    from ..merging.recipe import _bounded_loader

    try:
        text = read_bytes(card, MAX_CARD, "model card").decode("utf-8")
    except (NearswapError, OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.load(match.group(1), Loader=_bounded_loader())  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _gguf_origin(path: Path, name: str) -> Origin:
    from ..formats.gguf_header import HeaderError, read_header

    try:
        meta = read_header(path).metadata
    except (HeaderError, OSError):
        return Origin(str(path), name, None)
    hub, where = None, ""
    for key in ("general.repo_url", "general.source.repo_url", "general.source.url",  # the model itself, then
                "general.source.huggingface.repository", "general.base_model.0.repo_url"):  # the one it names
        value = meta.get(key)
        found = re.search(r"huggingface\.co/([\w.-]+/[\w.-]+?)(?:\.git)?/?$", value) if isinstance(value, str) else None
        if key == "general.source.huggingface.repository" and isinstance(value, str) and "/" in value:
            found = re.fullmatch(r"([\w.-]+/[\w.-]+)", value)
        if found:
            hub, where = found.group(1), f"GGUF {key}"
            break
    license = meta.get("general.license.name") if meta.get("general.license") == "other" else meta.get("general.license")
    return Origin(str(path), name, license if isinstance(license, str) else None,
                  "GGUF general.license" if isinstance(license, str) else "", hub, where)


def _hub_id_from_cache_path(path: Path) -> str | None:
    """``org/name`` for a model inside a Hugging Face cache (``models--org--name/snapshots/...``)."""
    for part in path.resolve().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            org, _, rest = part.removeprefix("models--").partition("--")
            return f"{org}/{rest}"
    return None


@dataclass(frozen=True)
class Terms:
    """A merge's license as the Hub's metadata writes it, and what the card says about it."""

    license: str  # a Hub license id, or "other" (then license_name), or "unknown"
    license_name: str | None
    note: str  # one or two sentences for the card


def combine(origins: Iterable[Origin]) -> Terms:
    """The merge's terms: the inputs' license when they all give the same one; otherwise the
    most restrictive (by ``rank``), saying which inputs disagree or say nothing."""
    origins = list(origins)
    said = [o for o in origins if o.license is not None]
    silent = [o for o in origins if o.license is None]
    distinct = sorted({o.license.strip().lower() for o in said})
    if not silent and len(distinct) == 1:
        return Terms(*hub_license(said[0].license), f"Every input is licensed {said[0].license}; so is this merge.")
    if not said:
        return Terms("unknown", None, "No input states a license: this merge's terms are unknown. Find each input's "
                                      "terms before using or sharing it.")
    parts = []
    if len(distinct) > 1:
        parts.append("The inputs' licenses disagree (" + "; ".join(f"{o.id}: {o.license}" for o in said) + ").")
    if silent:  # the most restrictive case: terms nobody stated may forbid anything
        parts.append("No license is stated by " + ", ".join(o.id for o in silent) + ", so this merge's terms are "
                     "unknown" + (" (the others: " + "; ".join(f"{o.id}: {o.license}" for o in said) + ")"
                                  if len(distinct) <= 1 else "") + ".")
        parts.append("A merge inherits the terms of every model it was made from: find each before using or "
                     "sharing it.")
        return Terms("unknown", None, " ".join(parts))
    top = max(rank(o.license) for o in said)
    strictest = sorted({o.license.strip().lower() for o in said if rank(o.license) == top})
    chosen = strictest[0] if len(strictest) == 1 else " AND ".join(strictest)
    lic, name = hub_license(chosen) if len(strictest) == 1 else ("other", _slug(chosen))
    parts.append(f"This card gives the most restrictive, {chosen} ({RANK_NAMES[top]}); a merge inherits the terms "
                 "of every model it was made from: check each before using or sharing it.")
    return Terms(lic, name, " ".join(parts))


def hub_license(license: str) -> tuple[str, str | None]:
    """(license, license_name) as a card's metadata holds them: a Hub id, or ``other`` and a name."""
    key = license.strip().lower()
    return (key, None) if key in RANKS else ("other", _slug(license))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.strip().lower()).strip("-")[:100] or "custom"
