"""What a config key is, for `dime-ds <command> --help`: its default as a command composes its config,
its allowed values, and its meaning: the comment beside its field in the schema (schema.py,
demo_schema.py; the `# ...` at the end of the field's line, else the comment lines right above it), as
docs/config.md gives it (scripts/config_reference.py, which generates that page, reads the comments
the same way). Read from the shipped source with `ast` and `tokenize`; nothing is hand-copied."""
from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import io
import tokenize
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from dime_ds.config.demo_schema import DemoRootConfig
from dime_ds.errors import UserError

REQUIRED = "???"


@dataclass(frozen=True)
class KeyDoc:
    key: str
    default: str  # as composed, unresolved: `???` is required, `${...}` an interpolation
    allowed: str  # a choice's values (`live|cache`); "" for other types
    meaning: str  # the field's comment in the schema; "" where it has none


# --- Comments in the source ----------------------------------------------------------------------

@cache
def _source(path: str) -> tuple[ast.Module, dict[int, str], frozenset[int]]:
    """The module's tree, its comments by line (without `#`) and the lines holding only a comment."""
    text = Path(path).read_text()
    lines = text.splitlines()
    comments, alone = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            comments[line] = tok.string.lstrip("#").strip()
            if lines[line - 1].lstrip().startswith("#"):
                alone.add(line)
    return ast.parse(text), comments, frozenset(alone)


def _class_node(cls: type) -> tuple[ast.Module | None, ast.ClassDef | None, dict[int, str], frozenset[int]]:
    """(its module's tree, the class statement, comments by line, comment-only lines); Nones without source."""
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:
        path = None
    if path is None or not Path(path).is_file():  # no source shipped: no comments, no crash
        return None, None, {}, frozenset()
    tree, comments, alone = _source(path)
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
    if len(nodes) > 1:  # the same name twice in one file: the one inspect places the class at
        line = inspect.findsource(cls)[1] + 1
        nodes = [n for n in nodes if n.lineno == line or any(d.lineno == line for d in n.decorator_list)]
    return tree, (nodes[0] if len(nodes) == 1 else None), comments, alone


def class_doc(cls: type) -> str:
    """The class's own docstring, on one line (dataclass() invents one for a class without)."""
    _, node, _, _ = _class_node(cls)
    return " ".join((ast.get_docstring(node) or "").split()) if node else ""


def module_doc(cls: type) -> str:
    """The docstring of the module that declares `cls`, on one line."""
    tree, _, _, _ = _class_node(cls)
    return " ".join((ast.get_docstring(tree) or "").split()) if tree else ""


@cache
def member_comments(cls: type) -> dict[str, str]:
    """The comment of each statement in the class body that assigns a name (fields, enum members)."""
    _, node, comments, alone = _class_node(cls)
    if node is None:
        return {}
    out = {}
    for stmt in node.body:
        names = ([stmt.target] if isinstance(stmt, ast.AnnAssign) else stmt.targets if isinstance(stmt, ast.Assign)
                 else [])
        for target in names:
            if isinstance(target, ast.Name):
                out[target.id] = _comment(stmt, comments, alone)
    return out


def _comment(stmt: ast.stmt, comments: dict[int, str], alone: frozenset[int]) -> str:
    trailing = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
                if n in comments and n not in alone]
    if trailing:
        return " ".join(trailing)
    above, line = [], stmt.lineno - 1
    while line in alone:
        above.insert(0, comments[line])
        line -= 1
    return " ".join(above)


def field_comment(cls: type, name: str) -> str:
    """The comment of field `name` where it is declared: in `cls` or the base class it comes from. A
    field without one that is its section's only field (`demo.compare`) has the section's docstring."""
    for klass in cls.__mro__:
        if name in inspect.get_annotations(klass):
            text = member_comments(klass).get(name, "")
            if not text and dataclasses.is_dataclass(klass) and len(dataclasses.fields(klass)) == 1:
                text = class_doc(klass)
            return text
    return ""


# --- Keys of the schema --------------------------------------------------------------------------

def _unwrap_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _field(key: str, root: type) -> tuple[type, dataclasses.Field, Any]:
    """(the section class, the field, its type) of a dotted key; KeyError if the schema has no such key."""
    cls, parts = root, key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            raise KeyError(f"the schema has no key {'.'.join(parts[:i + 1])!r}")
        tp = _unwrap_optional(typing.get_type_hints(cls)[part])
        if i == len(parts) - 1:
            return cls, fields[part], tp
        cls = tp
    raise KeyError(key)


def _allowed(tp: Any) -> str:
    if typing.get_origin(tp) in (list, tuple) and typing.get_args(tp):
        item = _unwrap_optional(typing.get_args(tp)[0])
        is_choice = isinstance(item, type) and issubclass(item, enum.Enum)
        return f"each of {'|'.join(m.value for m in item)}" if is_choice else ""
    return "|".join(m.value for m in tp) if isinstance(tp, type) and issubclass(tp, enum.Enum) else ""


def value_text(value: Any) -> str:
    """A config value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def _schema_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return value_text(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return value_text(f.default_factory())
    return REQUIRED


_ABSENT = object()


def _lookup(values: dict | None, key: str) -> Any:
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def describe(key: str, values: dict | None = None, root: type = DemoRootConfig) -> KeyDoc:
    """The key's default (its value in `values`, a composed config as `composed()` gives it; else the
    schema's default), allowed values and meaning. `root`: the schema whose fields are read (the demo's
    holds the library's and its own)."""
    cls, f, tp = _field(key, root)
    found = _lookup(values, key)
    default = _schema_default(f) if found is _ABSENT else value_text(found)
    return KeyDoc(key, default, _allowed(tp), field_comment(cls, f.name))


# --- Composition and config groups ---------------------------------------------------------------

def composed(overrides: Sequence[str] = ()) -> dict | None:
    """The config composed with `overrides`, as plain values, unresolved (interpolations stay `${...}`,
    required values `???`) and not validated; None when it does not compose."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dime_ds.config.load import config_dir, register

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    except (HydraException, OmegaConfBaseException, UserError, OSError):  # help falls back to the schema's defaults
        return None
    finally:
        GlobalHydra.instance().clear()


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files of configs/<group>/."""
    from dime_ds.config.load import config_dir

    try:
        return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
    except (UserError, OSError):
        return []


def group_default(group: str) -> str:
    """The option configs/config.yaml's defaults list picks for a group (`null`: none)."""
    import yaml

    from dime_ds.config.load import config_dir

    try:
        defaults = OmegaConf.to_container(OmegaConf.load(config_dir() / "config.yaml")).get("defaults", [])
    except (UserError, OSError, yaml.YAMLError, ValueError, AttributeError):
        return "?"
    for entry in defaults:
        if isinstance(entry, dict) and group in entry:
            return value_text(entry[group])
    return "null"
