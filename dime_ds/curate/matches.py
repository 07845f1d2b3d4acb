"""Per-shard match records, the resumable unit of the curation stage: input shard i's matched
sentences in `<curate.out_dir>/matches/shard-{i:06d}.*`:

- `.keys.txt`     the keys of the sentences that match at least one entry, one a line, in shard order;
- `.npz`          `offsets` int64 [n+1] and `entries` int32: sentence j matches
                  entries[offsets[j]:offsets[j+1]] (sorted indices into the normalised metadata);
- `.record.json`  {"source", "source_sha256", "metadata_sha256", "sentences", "matched", "skipped"},
                  written last: a shard whose record names the same source bytes and metadata is
                  not matched again (a killed or repeated run resumes).
Plain arrays, read with allow_pickle=False."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dime_ds import atomic
from dime_ds.curate.metaclip import Matcher, to_csr
from dime_ds.data.pipelines import SAMPLE_META, SampleError, decode_sample, iter_tar_samples
from dime_ds.data.shards import sha256_file


@dataclass
class ShardMatches:
    index: int  # the input shard's position in the sorted pool
    source: str
    keys: list[str]  # matched sentences only
    offsets: np.ndarray
    entries: np.ndarray
    record: dict


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def _paths(directory: Path, index: int) -> tuple[Path, Path, Path]:
    base = directory / shard_name(index)
    return (base.with_name(base.name + ".keys.txt"), base.with_name(base.name + ".npz"),
            base.with_name(base.name + ".record.json"))


def _load(directory: Path, index: int, source: str, checksum: str, metadata_sha256: str) -> ShardMatches | None:
    keys_path, npz_path, record_path = _paths(directory, index)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if (record.get("source_sha256"), record.get("metadata_sha256")) != (checksum, metadata_sha256):
            return None
        keys = keys_path.read_text(encoding="utf-8").splitlines()
        with np.load(npz_path, allow_pickle=False) as z:
            offsets, entries = z["offsets"], z["entries"]
    except (OSError, ValueError, KeyError):
        return None
    if len(keys) != record.get("matched") or len(offsets) != len(keys) + 1 or offsets[-1] != len(entries):
        return None
    return ShardMatches(index, str(source), keys, offsets, entries, dict(record, source=str(source)))


def match_shard(matcher: Matcher, directory: str | Path, index: int, source: str,
                metadata_sha256: str) -> tuple[ShardMatches, bool]:
    """Input shard `index` matched against the metadata, from its record when finished (see the
    module docstring). Returns (its matches, whether they were computed now). An undecodable
    sentence is skipped and listed; a sentence matching nothing is counted and dropped."""
    directory = Path(directory)
    checksum = sha256_file(source)
    done = _load(directory, index, source, checksum, metadata_sha256)
    if done is not None:
        return done, False
    directory.mkdir(parents=True, exist_ok=True)
    keys_path, npz_path, record_path = _paths(directory, index)
    record_path.unlink(missing_ok=True)  # from here on the shard does not read as finished
    keys, matched, skipped, sentences = [], [], [], 0
    for raw in iter_tar_samples([source]):
        try:
            sample = decode_sample({k: v for k, v in raw.items() if k in SAMPLE_META or k == "txt"})
            text = sample["text"]
        except SampleError as err:
            skipped.append({"key": raw.get("__key__"), "reason": str(err)})
            continue
        except KeyError:
            skipped.append({"key": raw.get("__key__"), "reason": "no txt field"})
            continue
        sentences += 1
        found = matcher(text)
        if found:
            keys.append(sample["key"])
            matched.append(found)
    offsets, entries = to_csr(matched)
    atomic.write_text(keys_path, "".join(k + "\n" for k in keys))
    buffer = io.BytesIO()
    np.savez(buffer, offsets=offsets, entries=entries)
    atomic.write_bytes(npz_path, buffer.getvalue())
    record = {"source": str(source), "source_sha256": checksum, "metadata_sha256": metadata_sha256,
              "sentences": sentences, "matched": len(keys), "skipped": skipped}
    atomic.write_json(record_path, record)
    return ShardMatches(index, str(source), keys, offsets, entries, record), True


def concat(parts: list[ShardMatches]) -> tuple[np.ndarray, np.ndarray]:
    """One CSR (offsets, entries) over several shards' matches, in the given order."""
    if not parts:
        return np.zeros(1, np.int64), np.zeros(0, np.int32)
    entries = np.concatenate([p.entries for p in parts]).astype(np.int32, copy=False)
    offsets = [np.zeros(1, np.int64)]
    base = 0
    for p in parts:
        offsets.append(p.offsets[1:] + base)
        base += int(p.offsets[-1])
    return np.concatenate(offsets), entries
