"""YAML with line numbers, and the range syntax of ``layers`` and split ``experts``."""

from __future__ import annotations

import pytest

from ktcore.errors import RuleError
from ktcore.rules.layers import format_ranges, parse_range
from ktcore.rules.yaml_lines import LineDict, LineList, load_yaml

DOC = """\
# comment
default_device: cpu
rules:
  - match: {name: 'a'}
    replace:
      op: experts
  - match:
      layers: 1-2
"""


def test_lines_of_keys_and_items():
    data, problems = load_yaml(DOC, "f.yaml")
    assert problems == []
    assert isinstance(data, LineDict) and data.line_of("default_device") == 2 and data.line_of("rules") == 3
    rules = data["rules"]
    assert isinstance(rules, LineList) and rules.item_lines == [4, 7]
    assert rules[0].line_of("replace") == 5 and rules[0]["replace"].line_of("op") == 6
    assert rules[1]["match"].line_of("layers") == 8
    assert rules[1]["match"]["layers"] == "1-2"


def test_scalars_are_typed_like_safe_load():
    data, _ = load_yaml("a: 3\nb: true\nc: null\nd: 1.5\ne: '3'\n", "f")
    assert data == {"a": 3, "b": True, "c": None, "d": 1.5, "e": "3"}


@pytest.mark.parametrize("text, line", [
    ("a: [1, 2\nb: 3\n", 2),  # unclosed flow sequence
    ("a: 1\n  b: 2\n", 2),  # bad indentation
    ("a: 'x\n", 2),  # unterminated quote
    ("rules:\n  - {a: 1}\n - b\n", 3),
])
def test_malformed_yaml_is_one_error_at_the_parser_line(text, line):
    with pytest.raises(RuleError) as info:
        load_yaml(text, "bad.yaml")
    assert info.value.line == line
    assert str(info.value).startswith(f"bad.yaml:{line}: invalid YAML")


def test_duplicate_keys_are_reported_not_silently_dropped():
    data, problems = load_yaml("a: 1\nb: 2\na: 3\n", "f.yaml")
    assert data == {"a": 1, "b": 2}
    assert [str(p) for p in problems] == ["f.yaml:3: duplicate key 'a' (first given at line 1)"]


def test_python_tags_are_refused():
    with pytest.raises(RuleError, match="f.yaml:1: invalid YAML"):
        load_yaml("a: !!python/object/apply:os.system ['true']\n", "f.yaml")
    with pytest.raises(RuleError, match="unsupported tag"):
        load_yaml("a: !!python/object:os.path {}\n", "f.yaml")


def test_aliases_and_merge_keys_work():
    data, _ = load_yaml("base: &b {op: experts}\nx:\n  <<: *b\n  backend: torch\n", "f")
    assert data["x"] == {"op": "experts", "backend": "torch"}


def test_empty_document_is_none():
    assert load_yaml("# nothing\n", "f") == (None, [])


# -- ranges --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, count, expected", [
    ("3", 10, {3}),
    (3, 10, {3}),
    ("1-3", 10, {1, 2, 3}),
    ("7-", 10, {7, 8, 9}),
    ("0,2,4-5", 10, {0, 2, 4, 5}),
    ([0, "4-5"], 10, {0, 4, 5}),
    ("all", 4, {0, 1, 2, 3}),
    ("0%-50%", 3, {0, 1}),  # round(1.5) = 2, half up
    ("50%-100%", 3, {2}),
    ("0%-50%", 61, set(range(31))),  # round(30.5) = 31
    ("50%-100%", 61, set(range(31, 61))),
    ("25%-", 8, set(range(2, 8))),
    ("0%-25%", 256, set(range(64))),
    ("12.5%-25%", 8, {1}),
    ("0-100", 3, {0, 1, 2}),  # indices past the end select nothing
    ("5", 3, set()),
])
def test_ranges_resolve(text, count, expected):
    assert parse_range(text).resolve(count) == frozenset(expected)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 27, 61, 94])
def test_percentages_partition_any_depth(count):
    parts = ["0%-25%", "25%-50%", "50%-75%", "75%-100%"]
    sets = [parse_range(p).resolve(count) for p in parts]
    assert sum(len(s) for s in sets) == count
    assert frozenset().union(*sets) == frozenset(range(count))


@pytest.mark.parametrize("text, message", [
    ("3-1", "ends before it starts"),
    ("x", "cannot read 'x' as a range"),
    ("1,,2", "empty item"),
    ("-1", "cannot read '-1'"),
    ("10%-120%", "past 100%"),
    ("60%-50%", "ends before it starts"),
    ("rest", "cannot read 'rest'"),  # rest only for split parts
    (True, "expected N, A-B"),
    ({"a": 1}, "expected N, A-B"),
])
def test_bad_ranges(text, message):
    with pytest.raises(ValueError, match=message):
        parse_range(text)


def test_rest_stands_alone_in_split_parts():
    assert parse_range("rest", allow_rest=True).rest
    with pytest.raises(ValueError, match="stands alone"):
        parse_range("0-3,rest", allow_rest=True)


def test_beyond_and_explicit():
    r = parse_range("2,6-9")
    assert r.beyond(8) == [9] and r.explicit() == frozenset({2, 6, 7, 8, 9})
    assert parse_range("2-").explicit() is None and parse_range("0%-5%").explicit() is None


def test_format_ranges():
    assert format_ranges([5, 1, 2, 3, 9, 10]) == "1-3,5,9-10"
    assert format_ranges([]) == ""
