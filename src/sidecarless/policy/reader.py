"""Reading one policy file's YAML nodes, collecting every error (file, line, field path) rather than stopping at
the first."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from sidecarless.policy.yamlnodes import Node

NOT_YET = {
    "spec": {"nodeSelector", "labels", "log"},
    "ingress": {"fromRequires", "fromGroups", "fromNodes", "icmps", "authentication"},
    "egress": {"toRequires", "toGroups", "toNodes", "toFQDNs", "toServices", "icmps", "authentication"},
    "cidrSet": {"cidrGroupRef", "cidrGroupSelector"},
    "portRule": {"listener", "originatingTLS", "terminatingTLS", "serverNames"},
    "rules": {"kafka", "dns", "l7proto", "l7"},
}


@dataclass(frozen=True)
class PolicyError:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


class PolicyFileError(Exception):
    """A file that cannot be accepted. Retrying does not help until the file changes."""

    def __init__(self, errors: list[PolicyError]) -> None:
        super().__init__("\n".join(str(error) for error in errors))
        self.errors = errors


T = TypeVar("T")


@dataclass
class Reader:
    """Walks one file, collecting every error rather than stopping at the first."""

    file: str
    errors: list[PolicyError] = field(default_factory=list)

    def error(self, node: Node, path: str, message: str) -> None:
        self.error_at(node.line, path, message)

    def error_at(self, line: int, path: str, message: str) -> None:
        self.errors.append(PolicyError(self.file, line, path, message))

    def mapping(
        self, node: Node, path: str, known: set[str], not_yet: frozenset[str] | set[str] = frozenset()
    ) -> dict[str, Node]:
        if not isinstance(node.value, dict):
            self.error(node, path, f"must be a mapping, not {kind_of(node.value)}")
            return {}
        fields: dict[str, Node] = node.value
        for key in fields:
            if key in not_yet:
                self.error_at(node.key_line(key), join_path(path, key), "not supported by this version of sidecarless")
            elif key not in known:
                known_list = ", ".join(sorted(known))
                self.error_at(node.key_line(key), join_path(path, key), f"unknown field (known: {known_list})")
        return {key: value for key, value in fields.items() if key in known}

    def sequence(self, node: Node, path: str, item: Callable[[Node, str], T | None]) -> tuple[T, ...]:
        if not isinstance(node.value, list):
            self.error(node, path, f"must be a list, not {kind_of(node.value)}")
            return ()
        results = [item(element, f"{path}[{index}]") for index, element in enumerate(node.value)]
        return tuple(result for result in results if result is not None)

    def string(self, node: Node, path: str) -> str | None:
        if not isinstance(node.value, str):
            self.error(node, path, f"must be a string, not {kind_of(node.value)}")
            return None
        return node.value

    def strings(self, node: Node, path: str) -> tuple[str, ...]:
        return self.sequence(node, path, self.string)

    def boolean(self, node: Node, path: str) -> bool | None:
        if not isinstance(node.value, bool):
            self.error(node, path, f"must be true or false, not {kind_of(node.value)}")
            return None
        return node.value


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def kind_of(value: object) -> str:
    if value is None:
        return "null"
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number"}
    return names.get(type(value), type(value).__name__)
