"""Class names and prompt templates for zero-shot classifiers. Built-in: OpenAI's ImageNet class
names and its 80 (and 7 "simple") ImageNet templates, as open_clip ships them. A dataset directory
may carry its own class names and templates, which win over the defaults."""
from __future__ import annotations

from pathlib import Path

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from dime_ds.errors import UserError

# open_clip's templates are callables (c -> str); ours are "{}" format strings like templates files.
TEMPLATE_SETS = {
    "openai_imagenet": [t("{}") for t in OPENAI_IMAGENET_TEMPLATES],
    "simple_imagenet": [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES],
    "simple": ["a photo of a {}."],
}
CLASSNAME_SETS = {"imagenet": list(IMAGENET_CLASSNAMES)}
DEFAULT_TEMPLATES = "openai_imagenet"
# File names dataset directories use for their templates: ours, then clip_benchmark's webdatasets'.
TEMPLATE_FILES = ("templates.txt", "zeroshot_classification_templates.txt")


class ClassNamesError(UserError, ValueError):
    """A class list naming one class twice: zero-shot could never predict the second."""


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _beside(data_dir: str | Path | None, names: tuple[str, ...]) -> str | None:
    """The first of `names` that exists in the dataset directory."""
    if data_dir is None:
        return None
    return next((str(Path(data_dir) / n) for n in names if (Path(data_dir) / n).is_file()), None)


def _set_or_file(kind: str, name_or_path: str, sets: dict[str, list[str]]) -> list[str]:
    if name_or_path in sets:
        return list(sets[name_or_path])
    if not Path(name_or_path).is_file():
        raise FileNotFoundError(f"{kind} {name_or_path!r}: neither a built-in set ({', '.join(sets)}) nor a file")
    return _lines(Path(name_or_path))


def load_templates(name_or_path: str | None, data_dir: str | Path | None = None) -> list[str]:
    """A named set, a file of templates, or (None) the dataset's own file / the default set."""
    name_or_path = name_or_path or _beside(data_dir, TEMPLATE_FILES) or DEFAULT_TEMPLATES
    templates = _set_or_file("templates", name_or_path, TEMPLATE_SETS)
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"{name_or_path}: every template needs a '{{}}' placeholder; bad: {bad[:3]}")
    return templates


def load_classnames(name_or_path: str | None, data_dir: str | Path | None = None,
                    folder_classes: list[str] | None = None) -> list[str]:
    """A built-in set, a file (one name per line), the dataset's classnames.txt, or (for an ImageFolder
    tree) its directory names with underscores as spaces."""
    name_or_path = name_or_path or _beside(data_dir, ("classnames.txt",))
    if name_or_path is None:
        if folder_classes:
            return _distinct([c.replace("_", " ") for c in folder_classes], f"{data_dir}'s class folders")
        raise FileNotFoundError(f"{data_dir}: no classnames.txt (one class name per line, in label order); "
                                f"set classnames to a file or a built-in set ({', '.join(CLASSNAME_SETS)})")
    names = _set_or_file("classnames", name_or_path, CLASSNAME_SETS)
    # Built-in lists are trusted as they are, and so is a file that copies one: OpenAI's ImageNet names
    # hold "missile" and "sunglasses" twice, for two distinct classes each.
    if name_or_path in CLASSNAME_SETS or names in CLASSNAME_SETS.values():
        return names
    return _distinct(names, name_or_path)


def _distinct(names: list[str], source: str) -> list[str]:
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            raise ClassNamesError(f"{source}: class name {name!r} is listed twice (names {first[name] + 1} and "
                                  f"{i + 1}); zero-shot cannot tell two classes of one name apart: make "
                                  "every class name distinct")
        first[name] = i
    return names
