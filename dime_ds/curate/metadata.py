"""The metadata list a pool is curated against, read from a file the user names (nothing is
downloaded): a JSON list of strings (MetaCLIP's released metadata.json) or plain text, one entry a
line. Both must be UTF-8.

Normalisation, reported in `Metadata.notes` and the curation report: surrounding whitespace of an
entry is stripped (MetaCLIP's entries have none, and a padded entry could only match double
spaces); empty entries are dropped; a repeated entry is dropped, its first occurrence kept (the
indices are those of the normalised list). Anything else (bytes that are not UTF-8, JSON that is not
a list of strings, an empty list) is a MetadataError naming the file and where."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from dime_ds.errors import UserError


class MetadataError(UserError, ValueError):
    """A metadata file that cannot be read as a list of entries."""


@dataclass(frozen=True)
class Metadata:
    path: str
    sha256: str
    entries: list[str]
    notes: list[str] = field(default_factory=list)  # what normalisation changed, for the report


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise MetadataError(f"metadata file {path}: byte {err.start} (line {line}) is not UTF-8 "
                            f"({data[err.start:err.start + 1]!r}); save the file as UTF-8") from None


def _parse(path: Path, text: str) -> list[str]:
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            raw = json.loads(text)
        except ValueError as err:
            raise MetadataError(f"metadata file {path}: not valid JSON: {err}") from None
        if not isinstance(raw, list):
            raise MetadataError(f"metadata file {path}: a JSON metadata file holds a list of strings, "
                                f"not a {type(raw).__name__}")
        bad = [i for i, e in enumerate(raw) if not isinstance(e, str)]
        if bad:
            raise MetadataError(f"metadata file {path}: item {bad[0]} is a {type(raw[bad[0]]).__name__}, "
                                f"not a string ({len(bad)} such item(s))")
        return raw
    return text.removeprefix("\ufeff").splitlines()


def normalise(raw: list[str]) -> tuple[list[str], list[str]]:
    """(entries, notes): stripped, without empty or repeated entries (first occurrence kept)."""
    entries, seen, notes = [], set(), []
    stripped = empty = repeated = 0
    for entry in raw:
        clean = entry.strip()
        if not clean:
            empty += 1
        elif clean in seen:
            repeated += 1
        else:
            stripped += clean != entry
            seen.add(clean)
            entries.append(clean)
    if stripped:
        notes.append(f"{stripped} entr{'y' if stripped == 1 else 'ies'} stripped of surrounding whitespace")
    if empty:
        notes.append(f"{empty} empty entr{'y' if empty == 1 else 'ies'} dropped")
    if repeated:
        notes.append(f"{repeated} repeated entr{'y' if repeated == 1 else 'ies'} dropped (first occurrence kept)")
    return entries, notes


def load_metadata(path: str) -> Metadata:
    """The normalised entries of the metadata file at `path` (see the module docstring)."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as err:
        raise MetadataError(f"curate.metadata={path}: cannot read it: {err.strerror or err}") from None
    entries, notes = normalise(_parse(p, _decode(p, data)))
    if not entries:
        raise MetadataError(f"metadata file {path} holds no entries")
    return Metadata(str(p), hashlib.sha256(data).hexdigest(), entries, notes)
