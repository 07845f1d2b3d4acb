"""`dime-ds shards SOURCE OUT_DIR`: a user's own files as the shards every stage reads (img2dataset's
layout, data/shards.py's writer): a folder of images (an ImageFolder or any tree; each sample's json
keeps the file's path under the folder), or a text file of sentences, one a line.

The set appears under OUT_DIR only when complete (atomic.staged_dir), so a stopped pack leaves no half
set that a stage would read as whole. An image the stages cannot decode is skipped and named, not
packed: a stage would skip it on every epoch."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from dime_ds import atomic
from dime_ds.cli import run_entry
from dime_ds.data.shards import ShardWriter
from dime_ds.errors import UserError

REPORT = "pack.json"
SHOWN = 5  # names quoted in a message


class PackError(UserError, ValueError):
    """A source that cannot be packed, or an OUT_DIR that already holds something."""


def _check_out(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PackError(f"{out_dir} exists and is not an empty directory: choose another OUT_DIR (nothing "
                        "was written)")


def _shown(items: Sequence[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def pack_images(folder: str | Path, out_dir: str | Path, per_shard: int = 10000, progress: bool = True) -> dict:
    """Every image under `folder` that the stages decode, one sample each, keyed by its rank in path
    order (a rerun writes the same shards)."""
    from tqdm import tqdm

    from dime_ds.data.pipelines import IMAGE_EXTS, SampleError, decode_image

    folder, out_dir = Path(folder), Path(out_dir)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower()[1:] in IMAGE_EXTS]
    other = sorted({p.suffix.lower() or p.name for p in files if p.suffix.lower()[1:] not in IMAGE_EXTS})
    if not images:
        raise PackError(f"no images in {folder} (looked for {', '.join(IMAGE_EXTS)} files"
                        + (f"; found {_shown(other)}" if other else "") + ")")
    _check_out(out_dir)
    skipped: dict[str, str] = {}
    packed = 0
    with atomic.staged_dir(out_dir) as staging:
        with ShardWriter(staging, maxcount=per_shard) as writer:
            for path in tqdm(images, desc="packing images", unit="image", disable=not progress):
                relative, data = path.relative_to(folder).as_posix(), path.read_bytes()
                try:
                    decode_image(data)  # the stages' own rule: what they would skip every epoch is not packed
                except Exception as err:  # SampleError and PIL's many kinds alike
                    skipped[relative] = str(err) if isinstance(err, SampleError) else f"{type(err).__name__}: {err}"
                    continue
                writer.write(f"{packed:09d}", {path.suffix.lower()[1:]: data, "json": json.dumps({"path": relative})})
                packed += 1
        if not packed:
            raise PackError(f"none of the {len(images)} images in {folder} opens: {_shown(list(skipped))}")
        report = {"source": str(folder.resolve()), "kind": "images", "samples": packed,
                  "shards": len(writer.paths), "skipped": skipped, "ignored": other}
        atomic.write_json(staging / REPORT, report, indent=2)
    return report


def pack_texts(path: str | Path, out_dir: str | Path, per_shard: int = 100000, progress: bool = True) -> dict:
    """Every non-blank line of `path` (UTF-8), stripped, one sample each, keyed by its line number."""
    from tqdm import tqdm

    path, out_dir = Path(path), Path(out_dir)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise PackError(f"{path}: line {line} is not UTF-8 ({err.reason}); save the file as UTF-8") from None
    sentences = [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip()]
    if not sentences:
        raise PackError(f"{path} holds no sentences (one a line)")
    _check_out(out_dir)
    with atomic.staged_dir(out_dir) as staging:
        with ShardWriter(staging, maxcount=per_shard) as writer:
            for number, sentence in tqdm(sentences, desc="packing sentences", unit="sentence", disable=not progress):
                writer.write(f"{number:09d}", {"txt": sentence})
        report = {"source": str(path.resolve()), "kind": "sentences", "samples": len(sentences),
                  "shards": len(writer.paths), "blank_lines": len(lines) - len(sentences)}
        atomic.write_json(staging / REPORT, report, indent=2)
    return report


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dime-ds shards", description=__doc__.split("\n\n")[0],
        epilog="e.g. `dime-ds shards photos/ data/images` then data.images=data/images; "
               "`dime-ds shards sentences.txt data/sentences` then data.corpus=data/sentences")
    parser.add_argument("source", type=Path, help="a folder of images (jpg, jpeg, png, webp files), or a text file")
    parser.add_argument("out_dir", type=Path, help="where the shards go (new, or an empty directory)")
    parser.add_argument("--per-shard", type=int, default=None,
                        help="samples a shard (default 10000 images or 100000 sentences)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.per_shard is not None and args.per_shard < 1:
        parser.error(f"--per-shard must be at least 1, got {args.per_shard}")
    if args.source.is_dir():
        pack, per_shard = pack_images, args.per_shard or 10000
    elif args.source.is_file():
        pack, per_shard = pack_texts, args.per_shard or 100000
    else:
        raise PackError(f"{args.source}: no such folder or file")
    report = pack(args.source, args.out_dir, per_shard, progress=not args.no_progress)
    print(f"{report['samples']} {report['kind']} in {report['shards']} shard(s) under {args.out_dir} "
          f"(report: {args.out_dir / REPORT})")
    if report.get("skipped"):
        print(f"skipped {len(report['skipped'])} image(s) that do not open: {_shown(list(report['skipped']))}",
              file=sys.stderr)
    if report.get("ignored"):
        print(f"not images, left out: {_shown(report['ignored'])} files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))
