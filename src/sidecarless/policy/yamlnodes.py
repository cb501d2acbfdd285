"""YAML documents as trees of values that remember their line, so every error can name file:line.

Pure: takes text, returns nodes. PyYAML's composer gives the marks; this module turns its nodes into
`Node(value, line)` where a mapping's value is `dict[str, Node]` and a sequence's is `list[Node]`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True)
class Node:
    value: Any  # dict[str, Node] | list[Node] | str | int | float | bool | None
    line: int  # 1-based
    key_lines: dict[str, int] | None = None  # for a mapping: the line of each key

    def key_line(self, key: str) -> int:
        return self.key_lines.get(key, self.line) if self.key_lines else self.line


class YamlError(Exception):
    """The text is not YAML this tool can read; `line` is where the reader stopped."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _Loader(yaml.CSafeLoader):
    """libyaml's safe loader (ten times faster than the pure-Python one: a policy from the Kubernetes API is
    parsed on every change), whose scalars we construct one at a time (no aliases to arbitrary objects)."""


def parse_documents(text: str) -> list[Node]:
    """All documents of a YAML stream, empty documents left out. Aliases are expanded within a budget: a few
    hundred bytes of nested aliases expand to gigabytes (a "billion laughs"); a file may hold no more values
    than it has bytes (or 10,000), which no file without aliases exceeds."""
    if text.startswith("{"):
        canonical = _canonical_json(text)
        if canonical is not None:
            return [canonical]
    budget = [max(MIN_VALUE_BUDGET, len(text))]
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as error:
        # A character YAML does not allow (NUL, other control characters): say where.
        raise YamlError(text[: error.position].count("\n") + 1, f"character {error.character!r} not allowed") from None
    try:
        documents: list[Node] = []
        while loader.check_node():
            root = loader.get_node()
            if root is not None:
                converted = _convert(loader, root, budget)
                if converted.value is not None:
                    documents.append(converted)
        return documents
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise YamlError(line, f"{error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise YamlError(1, str(error)) from None
    except RecursionError:
        # The reader recurses per level; no policy nests anywhere near this deep.
        raise YamlError(getattr(loader, "line", 0) + 1, "nested too deeply") from None
    finally:
        loader.dispose()


MAX_DEPTH = 64
MIN_VALUE_BUDGET = 10_000


def _canonical_json(text: str) -> Node | None:
    """A document exactly as `json.dumps(value, indent=2, sort_keys=True)` writes it (what the Kubernetes
    source hands over), read by the JSON parser, ten times faster than YAML's for 8,000 prefixes, with the
    lines YAML would give; None for any other text (YAML reads it). Floats are left to YAML: `1e+20` is a
    string there."""
    try:
        value = json.loads(text, parse_float=_no_float, parse_constant=_no_float)
    except (ValueError, _NotCanonical, RecursionError):
        return None
    if not isinstance(value, dict) or _SURROGATE.search(text) or json.dumps(value, indent=2, sort_keys=True) != text:
        return None
    return _json_node(value, [1], 0)


# A character outside the BMP, escaped as a surrogate pair: JSON joins the pair, YAML's reader does not.
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


class _NotCanonical(Exception):
    pass


def _no_float(_text: str) -> float:
    raise _NotCanonical


def _json_node(value: Any, line: list[int], depth: int) -> Node:
    """`line[0]`: the line this value starts on; on return, the line it ends on (indent=2 puts every key and
    item on a line of its own, and an empty {} or [] on the line it belongs to)."""
    start = line[0]
    if depth > MAX_DEPTH:
        raise YamlError(start, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        mapping: dict[str, Node] = {}
        key_lines: dict[str, int] = {}
        for key in sorted(value):
            line[0] += 1
            key_lines[key] = line[0]
            mapping[key] = _json_node(value[key], line, depth + 1)
        if value:
            line[0] += 1  # the closing brace
        return Node(mapping, start, key_lines)
    if isinstance(value, list):
        items = []
        for item in value:
            line[0] += 1
            items.append(_json_node(item, line, depth + 1))
        if value:
            line[0] += 1
        return Node(items, start)
    return Node(value, start)


def _convert(loader: _Loader, node: yaml.Node, budget: list[int], depth: int = 0) -> Node:
    line = node.start_mark.line + 1
    if depth > MAX_DEPTH:
        raise YamlError(line, f"nested deeper than {MAX_DEPTH} levels")
    budget[0] -= 1
    if budget[0] < 0:
        raise YamlError(line, "aliases expand to more values than the file has bytes")
    if isinstance(node, yaml.MappingNode):
        # Merge keys (a YAML 1.1 extension that JSON and the Kubernetes API do not have) are copied out
        # before any budget could count them: nested merges grow exponentially, so they are refused.
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlError(key_node.start_mark.line + 1, "merge keys (<<) are not accepted in policy files")
        mapping: dict[str, Node] = {}
        key_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise YamlError(key_node.start_mark.line + 1, f"mapping key {key!r} is not a string")
            if key in mapping:
                raise YamlError(key_node.start_mark.line + 1, f"duplicate key {key!r}")
            mapping[key] = _convert(loader, value_node, budget, depth + 1)
            key_lines[key] = key_node.start_mark.line + 1
        return Node(mapping, line, key_lines)
    if isinstance(node, yaml.SequenceNode):
        return Node([_convert(loader, item, budget, depth + 1) for item in node.value], line)
    return Node(loader.construct_object(node, deep=True), line)


def plain(node: Node) -> Any:
    """The document as plain dicts, lists and scalars (what the Kubernetes API would store)."""
    if isinstance(node.value, dict):
        return {key: plain(value) for key, value in node.value.items()}
    if isinstance(node.value, list):
        return [plain(item) for item in node.value]
    return node.value
