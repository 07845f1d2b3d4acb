"""Metadata files (dime_ds.curate.metadata): one entry a line or MetaCLIP's JSON list; empty lines,
repeated entries and surrounding whitespace are normalised as documented; bytes that are not UTF-8
and JSON that is not a list of strings are clear errors, never a crash."""
from __future__ import annotations

import json

import pytest

from dime_ds.curate.metadata import MetadataError, load_metadata
from dime_ds.errors import UserError


def test_plain_text_with_empty_lines_duplicates_and_padding(tmp_path):
    path = tmp_path / "meta.txt"
    path.write_bytes("\ufeffdog\n\nred dog\r\n  cat \ndog\n   \nDog\n".encode("utf-8"))
    meta = load_metadata(str(path))
    assert meta.entries == ["dog", "red dog", "cat", "Dog"]  # case-sensitive: Dog is its own entry
    assert meta.notes == ["1 entry stripped of surrounding whitespace", "2 empty entries dropped",
                          "1 repeated entry dropped (first occurrence kept)"]
    assert len(meta.sha256) == 64


def test_metaclip_json_list(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(["dog", "hot dog", "", "dog", "naïve"]), encoding="utf-8")
    meta = load_metadata(str(path))
    assert meta.entries == ["dog", "hot dog", "naïve"]
    assert meta.notes == ["1 empty entry dropped", "1 repeated entry dropped (first occurrence kept)"]


@pytest.mark.parametrize("content, message", [
    (b"dog\ncat\n\xff\xfe bad\n", r"byte 8 \(line 3\) is not UTF-8"),
    (b'["dog", 3]', "item 1 is a int, not a string"),
    (b'{"dog": 1}', "holds a list of strings, not a dict"),
    (b'["dog",', "not valid JSON"),
    (b"\n \n", "holds no entries"),
])
def test_bad_files_are_user_errors_naming_the_problem(tmp_path, content, message):
    path = tmp_path / ("meta.json" if content.startswith(b"{") else "meta.txt")
    path.write_bytes(content)
    with pytest.raises(MetadataError, match=message) as err:
        load_metadata(str(path))
    assert isinstance(err.value, UserError) and str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(MetadataError, match="cannot read it"):
        load_metadata(str(tmp_path / "nope.json"))
