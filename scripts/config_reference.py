"""Generate docs/config.md, the reference of every config key, from the typed schema.

    python scripts/config_reference.py            # the page, on stdout
    python scripts/config_reference.py --write    # (re)write docs/config.md
    python scripts/config_reference.py --check    # exit 1, naming what is stale, if docs/config.md is
    python scripts/config_reference.py --missing  # the keys whose field has no comment in the schema

Everything comes from the schema's dataclasses (dime_ds/config/schema.py, demo_schema.py): keys,
types, defaults (as written: interpolations stay unresolved), allowed values (a Choice enum's values,
the CHECK range rule in the field's metadata) and the meaning, which is the field's comment in the
source: the `# ...` at the end of its line, else the block of comment lines right above it. Section
texts are the dataclasses' docstrings. Comments are read with `ast` (where each class and field is)
and `tokenize` (where each comment is), so the page follows the source itself; no config is
composed. `render()` takes the root classes as arguments: a test passes a derived schema.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import re
import sys
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "config.md"
SCRIPT = "scripts/config_reference.py"
NONE = "—"  # a cell with nothing to say (a field without a comment)

if str(REPO) not in sys.path:  # run as `python scripts/config_reference.py` from a source tree
    sys.path.insert(0, str(REPO))

from dime_ds.config.describe import class_doc, field_comment, member_comments, module_doc, value_text  # noqa: E402
from dime_ds.config.schema import CHECK  # noqa: E402

# The range rules of dime_ds/config/validate.py, in words.
RULES = {
    "positive": "positive (> 0)",
    "non_negative": "non_negative (>= 0)",
    "fraction": "fraction ([0, 1])",
    "positive_fraction": "positive_fraction ((0, 1])",
}

INTRO = f"""\
# Configuration reference

This page lists every key of a dime_ds run's configuration: its type, default, allowed values and
meaning, section by section. Hydra composes a run's config from `configs/config.yaml` and its config
groups into the typed schema of `dime_ds/config/schema.py` (the demo's own sections:
`dime_ds/config/demo_schema.py`); `load_config([])` from `dime_ds.config` gives the library's
sections with these defaults.

**Generated** from the schema by `{SCRIPT}`: do not edit this page by hand. After changing the
schema, regenerate it with `python {SCRIPT} --write`; `python {SCRIPT} --check` names what is
stale, and tests/unit/test_config_reference.py fails until the page is regenerated.

**Overriding.** Set any key on the command line as `key=value` after the command:
`python -m dime_ds.distill experiment=demo optim.lr=1e-3 data.augment=false`; a list as
`optim.betas=[0.9,0.95]`, null as `key=null`. A key the schema does not have is refused, naming it
(datasets of your own are added as `+eval.datasets.NAME.path=DIR`). An experiment,
`configs/experiment/NAME.yaml` picked with `experiment=NAME`, is a small config that sets many keys
at once; the config groups (`teacher=`, `student=`, `data=`, `loss=`, `optim=`, `eval=` or `suite=`)
pick a YAML file from `configs/<group>/`.

**Columns.** *type*: `or null` means null is accepted. *default*: the schema's default as written:
`???` is a required value with no default, `${{...}}` an interpolation resolved when the config loads
(paths under `work_dir`); experiments and config groups may set other values. *allowed*: a choice's
values (what they mean: [Choice values](#choice-values)), or the range rule the loader checks:
positive (> 0), non_negative (>= 0), fraction ([0, 1]), positive_fraction ((0, 1]). *meaning*: the
field's comment in the schema; {NONE} where it has none.
"""


# --- The schema as sections and rows -------------------------------------------------------------

@dataclass
class Row:
    key: str
    type: str
    default: str
    allowed: str
    meaning: str
    choice: type | None = None  # the Choice enum of the value (or of a list's items)

    def cells(self) -> list[str]:
        return [f"`{self.key}`", self.type, self.default, self.allowed, self.meaning]


@dataclass
class Section:
    key: str  # "" for the top level; `eval.datasets.<name>` for a dict's entry section
    doc: str
    depth: int
    rows: list[Row] = field(default_factory=list)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return tp, False


def _choice_of(tp: Any) -> type | None:
    tp, _ = _unwrap_optional(tp)
    if typing.get_origin(tp) in (list, tuple):
        tp = typing.get_args(tp)[0]
    return tp if isinstance(tp, type) and issubclass(tp, enum.Enum) else None


def _type_name(tp: Any, homes: dict[type, str]) -> str:
    tp, optional = _unwrap_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        item = args[0] if args else Any
        if _is_section(item):
            name = f"list of `{homes[item]}` sections" if item in homes else f"list of {item.__name__} sections"
        else:
            name = f"list of {_type_name(item, homes)}"
    elif origin is dict:
        value = args[1] if len(args) > 1 else Any
        name = f"dict of `{homes[value]}` sections" if _is_section(value) and value in homes else "dict"
    elif tp is Any:
        name = "any"
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        name = "choice"
    elif isinstance(tp, type):
        name = tp.__name__
    else:
        name = str(tp).replace("typing.", "")
    return f"{name} or null" if optional else name


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "`???` (required)"
    text = value_text(value)
    return "`???` (required)" if text == "???" else f"`{text}`"


def _allowed(f: dataclasses.Field, tp: Any, homes: dict[type, str]) -> str:
    parts = []
    choice = _choice_of(tp)
    if choice is not None:
        parts.append(", ".join(f"`{m.value}`" for m in choice))
    if CHECK in f.metadata:
        parts.append(RULES.get(f.metadata[CHECK], f.metadata[CHECK]))
    base, _ = _unwrap_optional(tp)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin in (list, tuple) and args and _is_section(args[0]):
        parts.append(f"each entry: the keys of `{homes.get(args[0], args[0].__name__)}`")
    if origin is dict and len(args) > 1 and _is_section(args[1]):
        parts.append(f"each entry: the keys of `{homes.get(args[1], args[1].__name__)}`")
    return "; ".join(parts) or NONE


def _homes(root: type, prefix: str = "", out: dict[type, str] | None = None) -> dict[type, str]:
    """Where each section class first sits in the tree (TeacherConfig -> `teacher`); a dict's entry
    class sits at `<dict key>.<name>`."""
    out = {} if out is None else out
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        tp, _ = _unwrap_optional(hints[f.name])
        args = typing.get_args(tp)
        if _is_section(tp):
            out.setdefault(tp, prefix + f.name)
            _homes(tp, f"{prefix}{f.name}.", out)
        elif typing.get_origin(tp) is dict and len(args) > 1 and _is_section(args[1]):
            out.setdefault(args[1], f"{prefix}{f.name}.<name>")
            _homes(args[1], f"{prefix}{f.name}.<name>.", out)
    return out


def _sections(cls: type, key: str, depth: int, homes: dict[type, str], doc: str | None = None) -> list[Section]:
    hints = typing.get_type_hints(cls)
    section = Section(key, class_doc(cls) if doc is None else doc, depth)
    nested: list[Section] = []
    prefix = f"{key}." if key else ""
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        base, _ = _unwrap_optional(tp)
        args = typing.get_args(base)
        if _is_section(base):
            nested += _sections(base, prefix + f.name, depth + 1, homes)
            continue
        section.rows.append(Row(prefix + f.name, _type_name(tp, homes), _default(f), _allowed(f, tp, homes),
                                field_comment(cls, f.name), _choice_of(tp)))
        if typing.get_origin(base) is dict and len(args) > 1 and _is_section(args[1]):
            entry = f"{prefix}{f.name}.<name>"
            own = class_doc(args[1])
            text = f"One entry of `{prefix}{f.name}`, the per-dataset section: `{prefix}{f.name}.NAME.KEY`."
            nested += _sections(args[1], entry, depth + 1, homes, doc=f"{text} {own}".strip())
    return [section, *nested]


def schema_sections(root: type, demo_root: type | None = None) -> tuple[list[Section], list[Section]]:
    """The library's sections (from `root`) and the demo's own (the keys `demo_root` adds)."""
    homes = _homes(root)
    library = _sections(root, "", 0, homes)
    if demo_root is None:
        return library, []
    known = {r.key for s in library for r in s.rows}
    demo = []
    for s in _sections(demo_root, "", 0, _homes(demo_root, out=dict(homes))):
        rows = [r for r in s.rows if r.key not in known]
        if rows:
            demo.append(Section(s.key, s.doc if s.key not in {x.key for x in library} else "", s.depth, rows))
    return library, demo


# --- Markdown -------------------------------------------------------------------------------------

_CODE = re.compile(r"(`[^`]*`)")


def _md(text: str) -> str:
    """Text safe in a table cell: pipes escaped; `<`, `*` escaped outside code spans."""
    parts = _CODE.split(text)
    for i, part in enumerate(parts):
        if i % 2 == 0:
            part = part.replace("<", "&lt;").replace("*", r"\*")
        parts[i] = part.replace("|", r"\|")
    return "".join(parts)


def _table(rows: Iterable[Row]) -> list[str]:
    out = ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = [r.cells()[0], *(_md(c) if c else NONE for c in r.cells()[1:])]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _heading(level: int, section: Section) -> str:
    return "#" * level + " " + (f"`{section.key}`" if section.key else "Top level")


def _choices(rows: list[Row]) -> list[str]:
    used: dict[type, list[str]] = {}
    for r in rows:
        if r.choice is not None:
            used.setdefault(r.choice, []).append(r.key)
    out = ["## Choice values", "",
           ("What the values of a choice mean, for the choices whose values the schema comments on (a value "
            "without a comment is listed bare; the others' values are in the *allowed* column)."), ""]
    for choice, keys in used.items():
        comments = member_comments(choice)
        if not any(comments.get(m.name) for m in choice):
            continue
        doc = class_doc(choice)
        out += [f"### {choice.__name__}", "", "Used by " + ", ".join(f"`{k}`" for k in keys) + "."
                + (f" {_md(doc)}" if doc else ""), ""]
        for m in choice:
            text = comments.get(m.name, "")
            out.append(f"- `{m.value}`" + (f": {_md(text)}" if text else ""))
        out.append("")
    return out


def render(root: type | None = None, demo_root: type | None = None) -> str:
    """The page for a schema; by default dime_ds's RootConfig and DemoRootConfig."""
    if root is None:
        from dime_ds.config.demo_schema import DemoRootConfig
        from dime_ds.config.schema import RootConfig
        root, demo_root = RootConfig, DemoRootConfig
    library, demo = schema_sections(root, demo_root)
    out = [INTRO, "## Sections", ""]
    out += ["- " + (f"[`{s.key}`](#{_anchor(s)})" if s.key else "[Top level](#top-level)")
            for s in library if s.depth <= 1]
    if demo:
        out.append("- [Demo sections](#demo-sections-schema-demo)")
    out.append("- [Choice values](#choice-values)")
    out.append("")
    for s in library:
        out += [_heading(2 if s.depth <= 1 else 3, s), ""]
        if s.doc:
            out += [_md(s.doc), ""]
        out += _table(s.rows) + [""]
    if demo:
        out += ["## Demo sections (schema: demo)", ""]
        doc = module_doc(demo_root)
        if doc:
            out += [_md(doc), ""]
        for s in demo:
            title = f"### `{s.key}` (demo additions)" if any(s.key == x.key for x in library) else _heading(3, s)
            out += [title, ""]
            if s.doc:
                out += [_md(s.doc), ""]
            out += _table(s.rows) + [""]
    out += _choices([r for s in library + demo for r in s.rows])
    return "\n".join(out).rstrip("\n") + "\n"


def _anchor(section: Section) -> str:
    """GitHub's heading anchor for a section heading `` `key` ``."""
    return re.sub(r"[^a-z0-9 _-]", "", section.key.lower()).replace(" ", "-")


# --- Checking -------------------------------------------------------------------------------------

_ROW = re.compile(r"^\| `([^`]+)` \|")


def page_rows(page: str) -> dict[str, str]:
    """Key -> its table row, of a generated page."""
    return {m.group(1): line for line in page.splitlines() if (m := _ROW.match(line))}


def stale(current: str | None, expected: str) -> list[str]:
    """What differs between the page on disk (`current`, None if absent) and the generated one; []
    when they are equal."""
    if current is None:
        return ["docs/config.md does not exist"]
    if current == expected:
        return []
    have, want = page_rows(current), page_rows(expected)
    problems = [f"key not in the page: {k}" for k in want if k not in have]
    problems += [f"key no longer in the schema: {k}" for k in have if k not in want]
    problems += [f"row out of date: {k}" for k in want if k in have and have[k] != want[k]]
    if not problems:
        a, b = current.splitlines(), expected.splitlines()
        line = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        problems.append(f"text differs from line {line + 1}")
    return problems


def missing_comments(root: type | None = None, demo_root: type | None = None) -> list[str]:
    if root is None:
        from dime_ds.config.demo_schema import DemoRootConfig
        from dime_ds.config.schema import RootConfig
        root, demo_root = RootConfig, DemoRootConfig
    library, demo = schema_sections(root, demo_root)
    return [r.key for s in library + demo for r in s.rows if not r.meaning]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {PAGE.relative_to(REPO)}")
    mode.add_argument("--check", action="store_true", help="exit 1 if the page is stale, naming what")
    mode.add_argument("--missing", action="store_true", help="list the keys whose field has no comment")
    args = parser.parse_args(argv)
    if args.missing:
        print("\n".join(missing_comments()))
        return 0
    page = render()
    if args.write:
        PAGE.parent.mkdir(parents=True, exist_ok=True)
        PAGE.write_text(page)
        print(f"wrote {PAGE.relative_to(REPO)}", file=sys.stderr)
        return 0
    if args.check:
        problems = stale(PAGE.read_text() if PAGE.is_file() else None, page)
        if problems:
            print(f"{PAGE.relative_to(REPO)} is stale; regenerate it: python {SCRIPT} --write", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
