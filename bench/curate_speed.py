"""MetaCLIP curation speed (dime_ds.curate): matching throughput per core (sentences/s) of the
Aho-Corasick matcher against a MetaCLIP-sized metadata list, the plain substring rule it is tested
against (on a small list: it costs len(entries) substring scans per sentence), and balancing
(keep probability + keep draw). From the measured rate: the cost of curating a 10^9-sentence pool on
N nodes. One process, one core (the stage runs one process per core, each on its own shards).
Prints a table, writes JSON.

    .venv/bin/python bench/curate_speed.py                        # ~1 minute on one CPU core
    .venv/bin/python bench/curate_speed.py --entries 500000 --texts 200000 --cores-per-node 64

Synthetic data: a Zipf vocabulary of generated words; the metadata holds unigrams, bigrams and
three-word "titles" (MetaCLIP's 500k: WordNet synsets, Wikipedia unigrams, bigrams, titles); the
sentences are 8-16 Zipf words with punctuation, about the length of an alt-text or a caption."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POOL = 10 ** 9


def make_data(n_entries: int, n_texts: int, vocab: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    lengths = rng.integers(3, 10, int(vocab * 1.2))
    codes = rng.choice(letters, int(lengths.sum()))
    cuts = np.cumsum(lengths)[:-1]
    words = list(dict.fromkeys(w.tobytes().decode() for w in np.split(codes, cuts)))[:vocab]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    draws = iter(rng.choice(len(words), 40 * (n_entries + n_texts), p=zipf).tolist())  # one vectorised draw

    def draw(n):
        return [words[next(draws)] for _ in range(n)]

    n_uni = min(int(n_entries * 0.6), len(words))
    entries = dict.fromkeys(words[i] for i in sorted(rng.choice(len(words), n_uni, replace=False)))  # unigrams
    while len(entries) < n_entries:  # bigrams and titles, drawn from the same distribution as the texts
        entries[" ".join(draw(2 if rng.random() < 0.7 else 3))] = None
    entries = list(entries)
    punct = [" "] * 5 + [", ", ". ", "! ", "? ", ": ", " - "]
    seps = iter(rng.choice(len(punct), 16 * n_texts).tolist())
    texts = []
    for n in rng.integers(8, 17, n_texts).tolist():
        texts.append("".join(w + punct[next(seps)] for w in draw(n)).strip().capitalize())
    return entries, texts


def _rss_mib() -> float:
    """Resident memory now (not the peak: the data's generation peaks higher than the automaton)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _stage_rate(entries: list[str], texts: list[str], t: float) -> tuple[float, float]:
    """The whole curation stage in this process on `texts` written as 10 shards: read, match, count,
    balance, write. Returns (sentences/s without the automaton build, seconds)."""
    import tempfile

    from dime_ds.config import load_config
    from dime_ds.curate import metaclip
    from dime_ds.curate.stage import run_curate_stage
    from dime_ds.data.shards import ShardWriter

    with tempfile.TemporaryDirectory() as tmp:
        with ShardWriter(Path(tmp) / "pool", maxcount=max(1, len(texts) // 10)) as w:
            for i, text in enumerate(texts):
                w.write(f"{i:012d}", {"txt": text})
        (Path(tmp) / "metadata.json").write_text(json.dumps(entries))
        cfg = load_config([f"work_dir={tmp}", f"data.corpus={tmp}/pool", "data.texts=unused", "data.images=unused",
                           f"curate.metadata={tmp}/metadata.json", f"curate.t={t}", "device=cpu", "log.progress=false"])
        t0 = time.perf_counter()
        metaclip.Matcher(entries)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_curate_stage(cfg)
        seconds = time.perf_counter() - t0 - build
    return len(texts) / seconds, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=500_000)
    p.add_argument("--texts", type=int, default=50_000)
    p.add_argument("--vocab", type=int, default=1_000_000, help="distinct words (a random 60 %% of the entries)")
    p.add_argument("--reference-entries", type=int, default=2_000, help="metadata size for the substring rule")
    p.add_argument("--reference-texts", type=int, default=2_000)
    p.add_argument("--stage-texts", type=int, default=20_000, help="sentences through the whole stage (0: skip)")
    p.add_argument("--cores-per-node", type=int, default=64, help="for the 10^9-sentence projection")
    p.add_argument("--nodes", default="1,8,32,128", help="node counts of the projection")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench/results/curate_speed.json"))
    args = p.parse_args(argv)

    import numpy as np

    from dime_ds.curate import metaclip

    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core: the rate is per core
    except (AttributeError, OSError):
        pass
    t0 = time.perf_counter()
    entries, texts = make_data(args.entries, args.texts, args.vocab, args.seed)
    print(f"data: {len(entries)} entries, {len(texts)} sentences in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    rss_data = _rss_mib()
    t0 = time.perf_counter()
    matcher = metaclip.Matcher(entries)
    build_s = time.perf_counter() - t0
    rss_automaton = _rss_mib()
    t0 = time.perf_counter()
    matched = [matcher(t) for t in texts]
    match_s = time.perf_counter() - t0
    csr = metaclip.to_csr(matched)
    counts = metaclip.entry_counts(csr, len(entries))
    n_matched = int((np.diff(csr[0]) > 0).sum())
    size = lambda t: metaclip.expected_size_fixed(metaclip.keep_probability(csr, counts, t))  # noqa: E731
    t = metaclip.solve_t(size, 0.4 * n_matched, float(counts.max()))  # keep 40 % of the matched, in expectation
    keys = [f"{i:012d}" for i in range(len(texts))]
    t0 = time.perf_counter()
    kept = metaclip.keep_mask(keys, csr, counts, t, args.seed)
    balance_s = time.perf_counter() - t0

    small = entries[:args.reference_entries]
    ref_texts = texts[:args.reference_texts]
    t0 = time.perf_counter()
    ref = metaclip.match_reference(ref_texts, small)
    ref_s = time.perf_counter() - t0
    assert ref == metaclip.match(ref_texts, small), "the matcher disagrees with the substring rule"
    ref_rate = len(ref_texts) / ref_s
    ref_rate_full = ref_rate * len(small) / len(entries)  # the rule scans every entry: rate ~ 1/entries

    stage_rate, stage_s = (_stage_rate(entries, texts[:args.stage_texts], t) if args.stage_texts else (None, None))
    rate = len(texts) / match_s
    balance_rate = len(texts) / balance_s
    per_core = 1.0 / (1.0 / rate + 1.0 / balance_rate)  # match + balance, the two passes of the stage
    rows = [
        ("Aho-Corasick match (automaton built)", rate,
         f"{len(entries)} entries, {np.mean([len(m) for m in matched]):.2f} matches/sentence, "
         f"{100 * np.mean([bool(m) for m in matched]):.0f} % match"),
        ("substring rule (reference)", ref_rate, f"{len(small)} entries; ~{ref_rate_full:.1f}/s at {len(entries)}"),
        ("balancing (probability + draw)", balance_rate, f"t = {t:.3g} (a small pool: most entries are tail), "
                                                         f"kept {100 * kept.mean():.1f} %"),
        ("curation, per core (match + balance)", per_core, "the two passes' compute"),
    ]
    if stage_rate:
        rows.append(("whole stage, one rank (tar in, tar out)", stage_rate,
                     f"{args.stage_texts} sentences in {stage_s:.1f} s, automaton build excluded"))
    print(f"\nMetaCLIP curation, one CPU core ({platform.processor() or platform.machine()}); automaton build "
          f"{build_s:.1f} s, +{rss_automaton - rss_data:.0f} MiB\n")
    print(f"| {'step':<40} | sentences/s | notes |")
    print(f"|{'-' * 42}|------------:|-------|")
    for name, r, note in rows:
        print(f"| {name:<40} | {r:>11,.0f} | {note} |")
    nodes = [int(n) for n in args.nodes.split(",") if n]
    projection = []
    rates = {"compute": per_core, **({"stage": stage_rate} if stage_rate else {})}
    print(f"\n10^9 sentences on N nodes of {args.cores_per_node} cores (one rank per core), at the per-core rates "
          f"above: compute only ({per_core:,.0f}/s) and the whole stage ({(stage_rate or 0):,.0f}/s, tar reading "
          f"and writing included); per rank {build_s:.0f} s and {rss_automaton - rss_data:.0f} MiB for the automaton, "
          f"{8 * len(entries) / 2**20:.0f} MiB in the counts' all-reduce\n")
    print("| nodes | cores | compute only | whole stage | whole stage, core-hours |")
    print("|------:|------:|-------------:|------------:|------------------------:|")
    for n in nodes:
        cores = n * args.cores_per_node
        row = {"nodes": n, "cores": cores, **{f"{k}_seconds": POOL / (r * cores) for k, r in rates.items()},
               **{f"{k}_core_hours": POOL / r / 3600 for k, r in rates.items()}}
        projection.append(row)
        stage_cols = (f"{row['stage_seconds'] / 60:,.1f} min | {row['stage_core_hours']:,.0f}" if stage_rate
                      else "- | -")
        print(f"| {n} | {cores} | {row['compute_seconds'] / 60:,.1f} min | {stage_cols} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": {k: getattr(args, k) for k in ("entries", "texts", "vocab", "reference_entries", "reference_texts",
                                                   "cores_per_node", "seed")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "automaton": {"build_seconds": build_s, "rss_mib": rss_automaton - rss_data, "entries": len(entries)},
        "rates": {"match": rate, "reference": ref_rate, "reference_at_full_metadata": ref_rate_full,
                  "balance": balance_rate, "per_core": per_core, "stage": stage_rate},
        "matches_per_sentence": float(np.mean([len(m) for m in matched])), "t": t, "kept_share": float(kept.mean()),
        "projection_1e9": projection}, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
