"""Safe YAML loading that remembers the line of every mapping key and sequence item.

``yaml.safe_load`` throws positions away; rule errors must say ``file:line``. We compose the
node graph with PyYAML's safe loader and convert it ourselves: mappings become ``LineDict``
(a dict with ``line`` and ``key_lines``), sequences ``LineList`` (a list with ``line`` and
``item_lines``), scalars the plain Python values the safe constructor makes. Lines are
1-based. Nothing but the standard YAML tags is accepted, so no object is ever constructed.
"""

from __future__ import annotations

from typing import Any

import yaml

from ktcore.errors import RuleError

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


class LineDict(dict):
    """A mapping from YAML: ``line`` of the mapping, ``key_lines[key]`` of each key."""

    line: int = 1
    key_lines: dict[Any, int]

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class LineList(list):
    """A sequence from YAML: ``line`` of the sequence, ``item_lines[i]`` of each item."""

    line: int = 1
    item_lines: list[int]

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if 0 <= index < len(self.item_lines) else self.line


def line_of(value: Any, default: int = 1) -> int:
    """The line a converted YAML value started on (collections only), else ``default``."""
    return getattr(value, "line", default)


def load_yaml(text: str, file: str) -> tuple[Any, list[RuleError]]:
    """Parses one YAML document.

    Returns the converted value (None for an empty document) and the non-fatal problems found
    while converting (duplicate keys, keys that are not scalars). Malformed YAML raises a
    ``RuleError`` at the line the parser reports.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        converter = _Converter(loader, file)
        return converter.convert(node), converter.problems
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or "malformed YAML"
        if exc.context:
            message = f"{message} ({exc.context})"
        raise RuleError(f"invalid YAML: {message}", file, mark.line + 1 if mark else None) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
        raise RuleError(f"invalid YAML: {exc.reason} (character {exc.character!r})", file, line) from None
    except yaml.YAMLError as exc:
        raise RuleError(f"invalid YAML: {exc}", file, None) from None
    finally:
        loader.dispose()


class _Converter:
    def __init__(self, loader: yaml.SafeLoader, file: str):
        self.loader = loader
        self.file = file
        self.problems: list[RuleError] = []
        self._done: dict[int, Any] = {}  # id(node) -> value, for anchors/aliases
        self._active: set[int] = set()

    def convert(self, node: yaml.Node) -> Any:
        key = id(node)
        if key in self._done:
            return self._done[key]
        if key in self._active:
            raise RuleError("invalid YAML: an alias refers to itself", self.file, node.start_mark.line + 1)
        self._active.add(key)
        try:
            if isinstance(node, yaml.MappingNode):
                value = self._mapping(node)
            elif isinstance(node, yaml.SequenceNode):
                value = self._sequence(node)
            else:
                value = self.loader.construct_object(node, deep=True)
        finally:
            self._active.discard(key)
        self._done[key] = value
        return value

    def _check_tag(self, node: yaml.Node, expected: str) -> None:
        if node.tag != expected:
            raise RuleError(f"invalid YAML: unsupported tag {node.tag!r}", self.file, node.start_mark.line + 1)

    def _mapping(self, node: yaml.MappingNode) -> LineDict:
        self._check_tag(node, _MAP_TAG)
        self.loader.flatten_mapping(node)  # resolves '<<' merge keys
        out = LineDict()
        out.line = node.start_mark.line + 1
        out.key_lines = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append(RuleError("mapping keys must be plain words, not lists or mappings", self.file, line))
                continue
            key = self.loader.construct_object(key_node)
            if key in out:
                self.problems.append(RuleError(
                    f"duplicate key {key!r} (first given at line {out.key_lines[key]})", self.file, line))
                continue
            out[key] = self.convert(value_node)
            out.key_lines[key] = line
        return out

    def _sequence(self, node: yaml.SequenceNode) -> LineList:
        self._check_tag(node, _SEQ_TAG)
        out = LineList()
        out.line = node.start_mark.line + 1
        out.item_lines = []
        for item in node.value:
            out.append(self.convert(item))
            out.item_lines.append(item.start_mark.line + 1)
        return out
