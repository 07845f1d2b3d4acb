"""What `make study` (dime_ds/demo/study.py) compares beside the demo's DIME-FM student (raw pool,
live teacher, augmented images) and the from-scratch yardstick, chosen by `demo.compare`. A
comparison names its students (a table column and the experiment config it trains with), runs the
stages they need before training (once, whatever the seeds), and prints its lines under the study's
table (from the students' results averaged over the seeds)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dime_ds.config.schema import RootConfig

TEACHER_COLUMN = "teacher (CLIP, paired)"
RAW_COLUMN = "student DIME-FM (unpaired)"  # the raw sentence pool, live teacher, augmented images
BASELINE_COLUMN = "student from scratch (paired)"  # the yardstick: CLIP on as many pairs


@dataclass(frozen=True)
class Student:
    column: str  # the demo table's column
    experiment: str  # experiment=<this> trains it


def ground(cfg: RootConfig) -> dict:
    """Embed (shards embedded earlier from unchanged sources are skipped) and ground cfg's pool."""
    from dime_ds.embed.stage import run_embed_stage
    from dime_ds.match.stage import run_match_stage

    run_embed_stage(cfg)
    return run_match_stage(cfg)


def grounding_line(name: str, g: dict) -> str:
    kept = g["kinds"]["kept"]
    return (f"grounded corpus ({name} pool): {g['sentences_kept']} of {g['sentences']} sentences kept, "
            f"{100 * kept.get('describing', 0) / max(1, g['sentences_kept']):.1f} % of them describe an image")


def grounding_record(g: dict) -> dict:
    return {k: g[k] for k in ("sentences", "sentences_kept", "rounds", "kinds")}


def _percent(results: dict, column: str, dataset: str = "shape") -> str:
    return f"{100 * results[column][dataset]['top1']:.1f}"


class Comparison:
    name: str
    students: tuple[Student, ...]
    # Further demo teachers to train first: (their experiment, the student experiment that reads them)
    teachers: tuple[tuple[str, str], ...] = ()

    def prepare(self, cfgs: dict[str, RootConfig], raw: RootConfig) -> dict:
        """The stages the students need, before any of them trains."""
        return {}

    def lines(self, cfgs: dict[str, RootConfig], raw: RootConfig, prepared: dict, results: dict,
              summaries: dict[str, dict]) -> tuple[list[str], dict]:
        """(lines printed under the table, the record kept in demo_results.json)."""
        raise NotImplementedError


def _curation_line(what: str, r: dict) -> str:
    return (f"MetaCLIP curation of {what} (t = {r['t']:.0f}, {Path(r['metadata']['path']).name}, "
            f"{r['entries']['head']} head entries of {r['entries']['total']}): {r['sentences_kept']} of "
            f"{r['sentences']} sentences kept")


class Curation(Comparison):
    """MetaCLIP in DIME-FM: MetaCLIP curation against the world's concept lists, in both places: the sentence
    pool before it is grounded (demo_curated), and the grounded corpus after Algorithm 1
    (demo_curated_grounded, over the world's objects)."""

    name = "curation"
    students = (Student("student DIME-FM (curated pool)", "demo_curated"),
                Student("student DIME-FM (curated grounded)", "demo_curated_grounded"))

    def prepare(self, cfgs, raw):
        from dime_ds.curate.stage import run_curate_stage

        cfg = cfgs["demo_curated"]
        report, grounding = run_curate_stage(cfg), ground(cfg)
        after = run_curate_stage(cfgs["demo_curated_grounded"])  # of the raw pool's grounding: main() ran it
        return {"report": report, "grounding": grounding, "grounded_report": after}

    def lines(self, cfgs, raw, prepared, results, summaries):
        from dime_ds.demo.coverage import coverage_table, pool_sentences
        from dime_ds.demo.synthetic import SHAPES

        cfg, curation, after = cfgs["demo_curated"], prepared["report"], prepared["grounded_report"]
        pools = {"raw pool": pool_sentences(raw.data.corpus),
                 "curated pool": pool_sentences(str(Path(cfg.curate.out_dir) / "corpus")),
                 "grounded raw": pool_sentences(raw.data.texts),
                 "grounded curated": pool_sentences(cfg.data.texts),
                 "grounded, then curated": pool_sentences(cfgs["demo_curated_grounded"].data.texts)}
        per_class = {"raw": results[RAW_COLUMN]["shape"]["per_class"],
                     "curated pool": results[self.students[0].column]["shape"]["per_class"],
                     "curated grounded": results[self.students[1].column]["shape"]["per_class"]}
        table, coverage = coverage_table(pools, SHAPES, per_class)
        lines = [grounding_line("curated", prepared["grounding"]), "",
                 _curation_line("the pool before grounding", curation),
                 _curation_line("the grounded corpus after Algorithm 1", after),
                 "sentences naming each shape class, and the DIME-FM students' zero-shot top-1 per class (%):",
                 table]
        return lines, {"report": curation, "grounded_report": after,
                       "coverage": {**coverage, "t": curation["t"], "kept": curation["sentences_kept"]},
                       "grounding": grounding_record(prepared["grounding"])}


class Balance(Comparison):
    """CLIP-CID: the image pool semantically balanced, scored against the planted duplicates."""

    name = "balance"
    students = (Student("student DIME-FM (balanced images)", "demo_balanced"),)

    def prepare(self, cfgs, raw):
        from dime_ds.curate.balance_stage import run_semantic_balance
        from dime_ds.data.keep import keep_file, read_keep_keys
        from dime_ds.demo.duplicates import balance_scorecard

        cfg = cfgs["demo_balanced"]
        report = run_semantic_balance(cfg)
        score = balance_scorecard(cfg.data.synthetic, read_keep_keys(keep_file(cfg.balance.out_dir)))
        return {"report": report, "scorecard": score}

    def lines(self, cfgs, raw, prepared, results, summaries):
        r, s = prepared["report"], prepared["scorecard"]
        lines = [f"\nSemantic balance (beta = {r['beta']:g}, {Path(r['keep']).parent / 'report.md'}): "
                 f"{s['kept']} of {s['images']} images kept, {s['removed']} removed "
                 f"({100 * r['removed_share']:.1f} %). "
                 f"Planted near-duplicate pairs: {s['planted']}, {s['planted_caught']} caught "
                 f"({100 * s['planted_caught'] / max(1, s['planted']):.1f} %). Of the removed images, "
                 f"{s['removed_redundant']} show a scene a kept image shows and {s['removed_lost']} a scene "
                 f"that left the pool; distinct scenes {s['scenes_before']} -> {s['scenes_after']}.",
                 f"zero-shot shape top-1: full pool {_percent(results, RAW_COLUMN)}, balanced pool "
                 f"{_percent(results, self.students[0].column)} (%)"]
        return lines, {"report": r, "scorecard": s}


class Cid(Comparison):
    """CLIP-CID: cluster and instance discrimination beside DIME-FM's terms, on the balanced pool."""

    name = "cid"
    students = (Student("student DIME-FM + CID (balanced)", "demo_cid"),)

    def prepare(self, cfgs, raw):
        from dime_ds.curate.cluster_stage import run_cluster_stage

        return {"clusters": run_cluster_stage(cfgs["demo_cid"])}

    def lines(self, cfgs, raw, prepared, results, summaries):
        m, loss = prepared["clusters"], cfgs["demo_cid"].loss
        lines = [f"CLIP-CID terms: {m['k']} k-means pseudo-classes of the {m['count']} balanced images "
                 f"(sizes {m['cluster_size_min']}-{m['cluster_size_max']}), w_cluster = {loss.w_cluster:g} "
                 f"(scale {loss.cluster_scale:g}, margin {loss.cluster_margin:g}), w_instance = {loss.w_instance:g} "
                 f"(temperature {loss.instance_temperature:g}); zero-shot shape top-1: balanced "
                 f"{_percent(results, Balance.students[0].column)}, balanced + CID "
                 f"{_percent(results, self.students[0].column)} (%)"]
        return lines, {"clusters": m}


class Views(Comparison):
    """The cached teacher: the live teacher (raw column) against the teacher cached as one plain view
    without augmentation and as K augmented views."""

    name = "views"
    students = (Student("student DIME-FM (cache K=1, no aug)", "demo_cached"),
                Student("student DIME-FM (cache K=4 views)", "demo_views"))

    def prepare(self, cfgs, raw):
        from dime_ds.embed.stage import run_embed_stage

        # demo_cached reads the raw pool's cache, written when the raw pool was grounded
        return {"embed": run_embed_stage(cfgs["demo_views"])}

    def lines(self, cfgs, raw, prepared, results, summaries):
        live = summaries[RAW_COLUMN].get("samples_per_s", 0)
        rows = [(RAW_COLUMN.replace("(unpaired)", "(live teacher, aug)"), RAW_COLUMN),
                *((s.column, s.column) for s in self.students)]
        speeds = {name: summaries[column].get("samples_per_s", 0) for name, column in rows}
        views = cfgs["demo_views"].embed.views
        lines = [f"\nTeacher cache (K = 1: {cfgs['demo_cached'].teacher.cache_dir}; K = {views}: "
                 f"{cfgs['demo_views'].teacher.cache_dir}): zero-shot shape top-1 and training samples/s"]
        lines += [f"  {name}: {_percent(results, column)} %, {speeds[name]:.0f} samples/s"
                  + (f" ({speeds[name] / live:.2f}x live)" if live and column != RAW_COLUMN else "")
                  for name, column in rows]
        return lines, {"samples_per_s": speeds, "embed": prepared["embed"]}


class Families(Comparison):
    """A second student family: a MobileNet-style timm tower with BatchNorm (demo_mobile) distilled
    beside the ViT student from the same teacher and grounded corpus; what a user picks a student by:
    image-tower parameters, forward FLOPs per image and CPU latency, beside zero-shot."""

    name = "families"
    students = (Student("student DIME-FM (timm MobileNet)", "demo_mobile"),)
    BATCHES = (1, 32)

    def lines(self, cfgs, raw, prepared, results, summaries):
        import torch
        from safetensors.torch import load_file

        from dime_ds.engine.consolidate import student_from_state
        from dime_ds.models.flops import image_forward_flops
        from dime_ds.models.latency import latency_ms

        rows, record = [], {}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one core each: comparable across models, whatever else runs
        try:
            for column, cfg in ((RAW_COLUMN, raw), (self.students[0].column, cfgs["demo_mobile"])):
                student = student_from_state(cfg, load_file(summaries[column]["final_weights"]))
                size = int(student.model_cfg["vision_cfg"]["image_size"])
                r = {"image_params": summaries[column].get("image_params", 0),
                     "flops_per_image": image_forward_flops(student.encode_image, size),
                     **{f"latency_ms_batch{b}": latency_ms(student.encode_image, torch.zeros(b, 3, size, size))
                        for b in self.BATCHES},
                     "zero_shot_shape": results[column]["shape"]["top1"]}
                record[column] = r
                rows.append(f"  {column}: {r['image_params'] / 1e6:.2f}M image params, "
                            f"{r['flops_per_image'] / 1e6:.1f} MFLOPs/image, CPU latency (1 thread, eager fp32) "
                            + ", ".join(f"batch {b} {r[f'latency_ms_batch{b}']:.2f} ms" for b in self.BATCHES)
                            + f", zero-shot shape {100 * r['zero_shot_shape']:.1f} %")
        finally:
            torch.set_num_threads(threads)
        return ["\nStudent families (the same teacher, grounded corpus and schedule):", *rows], record


class Ensemble(Comparison):
    """Teacher ensembles: teacher B (the demo teacher's recipe from another seed) beside teacher A;
    students distilled from A (the raw column), from B, and from A+B (mean of their softmax
    distributions), on the same grounded corpus and schedule."""

    name = "ensemble"
    students = (Student("student DIME-FM (teacher B)", "demo_from_b"),
                Student("student DIME-FM (teachers A+B)", "demo_ensemble"))
    teachers = (("demo_teacher_b", "demo_from_b"),)

    def lines(self, cfgs, raw, prepared, results, summaries):
        columns = {"A": RAW_COLUMN, "B": self.students[0].column, "A+B": self.students[1].column}
        record = {name: {"shape": results[c]["shape"]["top1"],
                         "captions_i2t_r1": results[c]["captions"].get("image_to_text_R@1"),
                         "samples_per_s": summaries[c].get("samples_per_s", 0)} for name, c in columns.items()}
        rows = [f"  from {name}: zero-shot shape {100 * r['shape']:.1f} %, {r['samples_per_s']:.0f} samples/s"
                for name, r in record.items()]
        return ["\nTeacher ensemble (A = the demo teacher, B = its recipe from seed 1; students' means over "
                "the study's seeds, mean ± sd in its table):", *rows], record


COMPARISONS = {c.name: c for c in (Curation(), Balance(), Cid(), Views(), Families(), Ensemble())}


def selected(names) -> list[Comparison]:
    """The comparisons asked for, in the registry's order; cid brings balance (its pool) along."""
    wanted = set(names) | ({"balance"} if "cid" in names else set())
    return [c for name, c in COMPARISONS.items() if name in wanted]
