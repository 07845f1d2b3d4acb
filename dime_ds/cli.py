"""What every command-line entry point shares: logging set-up, and a user error (bad config, missing
data or weights) printed as a message (exit 2, or the error's own `exit_status`) rather than a
traceback; the `dime-ds` console script, one subcommand per entry point; and the help of the
entry points whose arguments are Hydra overrides: their usage, then their main keys, each with its
default and meaning read from the schema (dime_ds/config/describe.py).

In a job of several ranks, an error every rank raised alike carries `agreed_rank` (the rank's number;
distributed/stage.py and distributed/watchdog.py set it): rank 0 prints it (a traceback when it is
not the user's), the others only exit with the same status, so the job's log holds it once."""
from __future__ import annotations

import ast
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from dime_ds.errors import UserError
from dime_ds.log.setup import setup_logging

HELP_FLAGS = ("-h", "--help")


def run_entry(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None,
              usage: str | None = None) -> int:
    """`usage`: the help text of an entry point whose arguments are Hydra overrides (argparse entry
    points print their own), shown for -h/--help instead of a grammar error, with the main keys of
    the `dime-ds` command that runs `main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if usage and any(a in HELP_FLAGS for a in argv):
        print(hydra_help(usage, _command_of(main)))
        return 0
    setup_logging()
    try:
        return main(argv)
    except UserError as err:
        if not getattr(err, "agreed_rank", 0):
            print(err, file=sys.stderr)
        return getattr(err, "exit_status", 2)
    except Exception as err:
        if getattr(err, "agreed_rank", 0):
            return 1  # the status of the traceback rank 0 shows
        raise


class Command(NamedTuple):
    module: str  # whose `main` the command runs
    hydra: bool  # main takes Hydra overrides: the module's docstring and MAIN_KEYS are its --help; else argparse's
    summary: str  # what it does, on one line of `dime-ds --help`


# `dime-ds <command>` runs what `python -m <module>` runs.
COMMANDS: dict[str, Command] = {
    "distill": Command("dime_ds.distill", True,
                       "distil a teacher into a student (DIME-FM, or CLIP on pairs; DeepSpeed)"),
    "curate": Command("dime_ds.curate.__main__", True,
                      "curate the pools: MetaCLIP sentences, CLIP-CID semantic balance, k-means"),
    "match": Command("dime_ds.match.__main__", True,
                     "embed images and sentences with the teacher; ground a corpus (Algorithm 1)"),
    "eval": Command("dime_ds.eval.__main__", True, "evaluate a model on a suite: zero-shot, retrieval, linear probe"),
    "export": Command("dime_ds.export", False, "a distilled student as a plain OpenCLIP model directory (and ONNX)"),
    "pipeline": Command("dime_ds.pipeline", True, "curate, embed and match in one job, in the order given"),
    "launch": Command("dime_ds.launch", False, "submit a stage to SLURM through submitit (or run it here: --local)"),
    "demo": Command("dime_ds.demo.__main__", True,
                    "the whole pipeline on a synthetic world, on one CPU machine (make demo)"),
    "study": Command("dime_ds.demo.study", True,
                     "the demo's comparisons over student seeds, mean ± sd per cell (make study)"),
    "shards": Command("dime_ds.data.pack", False,
                      "pack a folder of images or a text file of sentences into the shards the stages read"),
    "synthetic": Command("dime_ds.demo.synthetic", False,
                         "write the demo's synthetic world (images, sentences, eval sets)"),
}


class Alias(NamedTuple):
    """A command's shorthand for a config key (`stage=` for `match.stage=`)."""
    name: str
    key: str


class Group(NamedTuple):
    """A config group, picked as `name=OPTION` (configs/<group>/OPTION.yaml)."""
    name: str
    group: str
    meaning: str


class Own(NamedTuple):
    """An argument the command reads itself, outside the config."""
    name: str
    default: str
    meaning: str


_EXPERIMENT = Group("experiment", "experiment", "a small config that sets many keys at once")
_PRETRAIN = Own("pretrain.<key>", "-", "a key of the demo teacher's recipe (experiment=demo_teacher), e.g. "
                 "pretrain.optim.steps=1000; a changed recipe trains a teacher of its own")
_STAGE_KEYS = ("data.images", "data.corpus", "curate.metadata", "curate.t", "match.embed_dir", "match.out_dir")

# What `dime-ds <command> --help` lists under "main keys", in this order. A plain name is a schema key;
# its default (as the command composes its config) and meaning (its field's comment) come from the
# schema, never from here.
MAIN_KEYS: dict[str, tuple[str | Alias | Group | Own, ...]] = {
    "distill": (_EXPERIMENT, "teacher.arch", "teacher.pretrained", "teacher.source", "student.arch", "student.text",
                "data.images", "data.texts", "loss.w_vl", "loss.w_pvl", "loss.w_ud", "optim.steps",
                "optim.global_batch_size", "optim.lr", "dist.ds_config", "ckpt.resume", "ensemble.teachers"),
    "curate": (Alias("stage", "curate.stage"), "curate.metadata", "curate.t", "curate.target_size", "curate.tail_share",
               "data.corpus", "match.embed_dir", "balance.beta", "cluster.k"),
    "match": (Alias("stage", "match.stage"), "teacher.arch", "data.images", "data.corpus", "match.embed_dir",
              "match.out_dir", "match.index", "embed.views"),
    "eval": (Alias("model", "eval.model"), Alias("pretrained", "eval.pretrained"),
             Group("suite", "eval", "the evaluation suite (the `eval=` config group), or suite=/path/suite.yaml"),
             "eval.root", "eval.teacher"),
    "pipeline": (Own("stages", "???", "the stages to run, in the order they run: curate, embed, match "
                                      "(stages=embed,match; see above)"), *_STAGE_KEYS),
    "demo": ("work_dir", "seed", "optim.steps", _PRETRAIN),
    "study": (Own("seeds", "3", "student seeds per column (0 to seeds-1); the teachers are trained once"),
              "demo.compare", "work_dir", "optim.steps", _PRETRAIN),
}
# The overrides a command composes its config with before the user's (the demo's students: experiment=demo).
COMPOSED_WITH: dict[str, tuple[str, ...]] = {"demo": ("experiment=demo",), "study": ("experiment=demo",)}

CONFIG_REFERENCE = "docs/config.md"


def _width() -> int:
    return min(max(shutil.get_terminal_size((100, 24)).columns, 60), 110)


def main_keys(command: str) -> list[str]:
    """The lines of `command`'s main keys: `key=default  (allowed)` and its meaning below."""
    from dime_ds.config.describe import composed, describe, group_default, group_options

    entries = MAIN_KEYS.get(command, ())
    values = composed(COMPOSED_WITH.get(command, ())) if entries else None
    width, out = _width(), []
    for entry in entries:
        if isinstance(entry, Group):
            options = [o for o in group_options(entry.group) if o != "none"]
            name, default, allowed = entry.name, group_default(entry.group), ""
            meaning = f"{entry.meaning}; configs/{entry.group}/: {', '.join(options)}"
        elif isinstance(entry, Own):
            name, default, allowed, meaning = entry.name, entry.default, "", entry.meaning
        else:
            key = entry.key if isinstance(entry, Alias) else entry
            doc = describe(key, values)
            name, default, allowed, meaning = key, doc.default, doc.allowed, doc.meaning
            if isinstance(entry, Alias):
                name, allowed = entry.name, "; ".join(filter(None, [f"short for {key}=", allowed]))
        line = f"  {name}={default}"
        if allowed and len(line) + len(allowed) + 4 <= width:
            line += f"  ({allowed})"
        elif allowed:
            meaning = f"({allowed}) {meaning}"
        out.append(line)
        out += textwrap.wrap(meaning or "-", width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return out


def hydra_help(usage: str, command: str | None = None) -> str:
    """The --help of an entry point whose arguments are Hydra overrides: its usage, then the main keys
    of `command` (MAIN_KEYS)."""
    text = usage.strip() + "\n\nArguments are Hydra overrides (key=value); config groups: configs/."
    keys = main_keys(command) if command else []
    if keys:
        text += ("\n\nmain keys (key=default as this command composes it; ??? is required):\n" + "\n".join(keys))
    return text + (f"\n\nEvery key with its type, default and meaning: {CONFIG_REFERENCE} "
                   "(from dime_ds/config/schema.py).")


def _command_of(main: Callable) -> str | None:
    """The `dime-ds` command whose module defines `main` (run as `python -m`, that module is __main__)."""
    module = getattr(main, "__module__", None)
    if module == "__main__":
        import __main__

        spec = getattr(__main__, "__spec__", None)
        module = spec.name if spec else module
    return next((name for name, c in COMMANDS.items() if c.module == module), None)


def _usage(module: str) -> str:
    """A module's docstring, read from its source: --help imports none of the command's code (the demo's
    imports torch)."""
    path = Path(__file__).resolve().parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    try:
        return ast.get_docstring(ast.parse(path.read_text())) or ""
    except (OSError, SyntaxError):
        import importlib

        return importlib.import_module(module).__doc__ or ""


def listing() -> str:
    """`dime-ds --help`: one line per command."""
    width = max(map(len, COMMANDS)) + 2
    lines = [f"  {name:<{width}}{c.summary}" for name, c in COMMANDS.items()]
    return ("usage: dime-ds <command> [arguments]\n\ncommands:\n" + "\n".join(lines) + "\n\n"
            "`dime-ds <command> --help`: its usage and main keys (each command is also `python -m <its module>`).\n"
            f"Every config key with its default and meaning: {CONFIG_REFERENCE}.")


def console(argv: Sequence[str] | None = None) -> int:
    """The `dime-ds` console script: `dime-ds distill experiment=demo` runs what
    `python -m dime_ds.distill experiment=demo` runs."""
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command not in COMMANDS:
        if command is None or command in HELP_FLAGS:
            print(listing())
            return 0
        import difflib

        near = difflib.get_close_matches(command, COMMANDS, n=1)
        print(f"dime-ds: unknown command {command!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
              + "\n" + listing(), file=sys.stderr)
        return 2
    spec = COMMANDS[command]
    if spec.hydra and any(a in HELP_FLAGS for a in argv[1:]):
        print(hydra_help(_usage(spec.module), command))
        return 0
    module = importlib.import_module(spec.module)
    return run_entry(module.main, argv[1:], usage=module.__doc__ if spec.hydra else None)
