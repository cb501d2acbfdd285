"""The map sync never leaves a kernel map too full for the next sync (issue 12): against a table that refuses
entries beyond its size, as the kernel does."""

import errno
from typing import Any

import pytest

from sidecarless.redirect.bpf import MapFull, _sync_table


class FakeTable(dict[Any, Any]):
    """A BPF hash map's behaviour that matters here: a new key beyond max_entries is refused (ENOSPC)."""

    def __init__(self, max_entries: int, name: str = "scl_policy") -> None:
        super().__init__()
        self.max_entries = max_entries
        self.name = name
        self.writes: list[Any] = []

    def update(self, key: Any, value: Any) -> None:
        if key not in self and len(self) >= self.max_entries:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.writes.append(("set", key))
        self[key] = value

    def delete(self, key: Any) -> bool:
        self.writes.append(("delete", key))
        return self.pop(key, None) is not None


def sync(table: FakeTable, wanted: dict[Any, Any]) -> bool:
    return _sync_table(table, dict(table), wanted, lambda key: key, lambda value: value)


def test_adds_go_before_deletes_while_both_versions_fit() -> None:
    table = FakeTable(10)
    sync(table, {1: "a", 2: "b"})
    table.writes.clear()
    assert sync(table, {2: "b", 3: "c"})
    assert table.writes == [("set", 3), ("delete", 1)]
    assert dict(table) == {2: "b", 3: "c"}


def test_a_full_map_deletes_first_so_the_next_set_fits() -> None:
    table = FakeTable(4)
    sync(table, {1: "a", 2: "b", 3: "c", 4: "d"})
    table.writes.clear()
    # Old and new together would need 7 entries: the stale ones go first.
    assert sync(table, {4: "d", 5: "e", 6: "f", 7: "g"})
    assert table.writes[:3] == [("delete", 1), ("delete", 2), ("delete", 3)]
    assert dict(table) == {4: "d", 5: "e", 6: "f", 7: "g"}


def test_a_set_that_does_not_fit_raises_map_full_and_the_next_good_one_applies() -> None:
    table = FakeTable(3)
    sync(table, {1: "a"})
    with pytest.raises(MapFull, match="scl_policy: no room for 4 entries \\(3 max\\)"):
        sync(table, {10: "x", 11: "y", 12: "z", 13: "w"})
    assert sync(table, {1: "a", 2: "b"})
    assert dict(table) == {1: "a", 2: "b"}


def test_nothing_to_change_writes_nothing() -> None:
    table = FakeTable(3)
    sync(table, {1: "a"})
    table.writes.clear()
    assert not sync(table, {1: "a"})
    assert table.writes == []
