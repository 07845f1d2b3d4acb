"""Class names and prompt templates for zero-shot classifiers. Built-in: OpenAI's ImageNet class
names and its 80 (and 7 "simple") ImageNet templates, as open_clip ships them. A dataset directory
may carry its own class names and templates, which win over the defaults."""
from __future__ import annotations

from pathlib import Path

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

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


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_templates(name_or_path: str | None, data_dir: str | Path | None = None) -> list[str]:
    """A named set, a file of templates, or (None) the dataset's own file / the default set."""
    if name_or_path is None and data_dir is not None:
        name_or_path = next((str(Path(data_dir) / f) for f in TEMPLATE_FILES if (Path(data_dir) / f).is_file()), None)
    name_or_path = name_or_path or DEFAULT_TEMPLATES
    if name_or_path in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"templates {name_or_path!r}: neither a built-in set "
                                f"({', '.join(TEMPLATE_SETS)}) nor a file")
    templates = _lines(path)
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"{path}: every template needs a '{{}}' placeholder; bad: {bad[:3]}")
    return templates


def load_classnames(name_or_path: str | None, data_dir: str | Path | None = None,
                    folder_classes: list[str] | None = None) -> list[str]:
    """A built-in set, a file (one name per line), the dataset's classnames.txt, or (for an ImageFolder
    tree) its directory names with underscores as spaces."""
    if name_or_path is None and data_dir is not None and (Path(data_dir) / "classnames.txt").is_file():
        name_or_path = str(Path(data_dir) / "classnames.txt")
    if name_or_path is None:
        if folder_classes:
            return [c.replace("_", " ") for c in folder_classes]
        raise FileNotFoundError(f"{data_dir}: no classnames.txt (one class name per line, in label order); "
                                f"set classnames to a file or a built-in set ({', '.join(CLASSNAME_SETS)})")
    if name_or_path in CLASSNAME_SETS:
        return list(CLASSNAME_SETS[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"classnames {name_or_path!r}: neither a built-in set "
                                f"({', '.join(CLASSNAME_SETS)}) nor a file")
    return _lines(path)
