"""Prompt template sets for zero-shot classifiers. A dataset directory may carry its own
`templates.txt` (one template with `{}` per line), which wins over a named set."""
from __future__ import annotations

from pathlib import Path

TEMPLATE_SETS = {
    "simple": ["a photo of a {}."],
}


def load_templates(name_or_path: str | None, data_dir: str | Path | None = None) -> list[str]:
    """A named set, a file of templates, or (None) the dataset's own templates.txt / `simple`."""
    if name_or_path is None and data_dir is not None and (Path(data_dir) / "templates.txt").is_file():
        name_or_path = str(Path(data_dir) / "templates.txt")
    name_or_path = name_or_path or "simple"
    if name_or_path in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"templates {name_or_path!r}: neither a named set "
                                f"({', '.join(TEMPLATE_SETS)}) nor a file")
    templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"{path}: every template needs a '{{}}' placeholder; bad: {bad[:3]}")
    return templates
