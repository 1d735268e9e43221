"""A dataset's rows, each an item or a bad row: skipped and counted, or with on_bad_row="fail" the end
of the load, naming the file and the row. For the task datasets (tasks.py) and SFT trajectory files."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Literal, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
Rows = Iterable[tuple[str, Any]]  # (where to find the row for a person: "line 3", "row 2"; the row)


class BadRowError(ValueError):
    """A dataset row that cannot become an item (raised with on_bad_row='fail')."""


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """The items read from a dataset, and what was skipped on the way."""

    items: list[T]
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)  # reason -> rows

    @classmethod
    def from_rows(cls, path: Path, rows: Rows, parse: Callable[[int, Any], T],
                  on_bad_row: Literal["skip", "fail"], what: str = "rows"):
        """The items `parse(index, row)` makes of `rows` (index from 0). A row it refuses with BadRowError,
        or that `rows` holds as one (a line that is not JSON), is skipped, logged and counted, or with
        on_bad_row="fail" stops the load naming the file and the row."""
        if on_bad_row not in ("skip", "fail"):
            raise ValueError(f"on_bad_row must be 'skip' or 'fail', got {on_bad_row!r}")
        items, reasons = [], Counter()
        for index, (where, row) in enumerate(rows):
            try:
                if isinstance(row, BadRowError):
                    raise row
                items.append(parse(index, row))
            except BadRowError as exc:
                if on_bad_row == "fail":
                    raise BadRowError(f"{path}, {where}: {exc} (set on_bad_row='skip' to skip such {what})") from None
                reasons[str(exc)] += 1
        skipped = sum(reasons.values())
        if skipped:
            summary = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common())
            logger.warning("%s: skipped %d bad %s of %d (%s)", path, skipped, what, skipped + len(items), summary)
        return cls(items, skipped, dict(reasons))


def field_text(row: dict[str, Any], name: str, refuse: tuple[type, ...] = (dict, list)) -> str:
    """The row's field `name` as text: a number is fine (an answer of 42), a list or an object is not one."""
    value = row.get(name)
    if value is None:
        raise BadRowError(f"field {name!r} is missing")
    if isinstance(value, refuse):
        raise BadRowError(f"field {name!r} is a {type(value).__name__}, expected text or a number")
    return str(value)


def jsonl_rows(path: Path) -> list[tuple[str, Any]]:
    """The rows of a JSON Lines file; a line that is not JSON is a BadRowError, blank lines are none."""
    # Read by hand rather than through `datasets`: errors can then name the line, and a row
    # with a missing key is a bad row rather than a schema error for the whole file.
    rows: list[tuple[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                row = BadRowError(f"the line is not valid JSON ({exc.msg})")
            rows.append((f"line {line_no}", row))
    return rows
