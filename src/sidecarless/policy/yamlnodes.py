"""YAML documents as trees of values that remember their line, so every error can name file:line.

Pure: takes text, returns nodes. PyYAML's composer gives the marks; this module turns its nodes into
`Node(value, line)` where a mapping's value is `dict[str, Node]` and a sequence's is `list[Node]`.
"""

from __future__ import annotations

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
