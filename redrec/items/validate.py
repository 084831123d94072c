"""Reading and checking a file of new items before anything is written.

A file is JSON Lines (``.jsonl``/``.ndjson``), CSV or Parquet with one item per row: ``item_id``,
``title``, ``body`` (optional), ``tags`` (a list, or a comma-separated string) and ``scenarios``
(a list, or a comma-separated string, of scenarios the item may be shown in). Every problem of the
file is collected and reported at once, each naming its row (1-based, as an editor counts lines)
and field with the fix; a file with any problem is refused whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

COLUMNS = ("item_id", "title", "body", "tags", "scenarios")


@dataclass(frozen=True)
class ItemLimits:
    max_id_len: int = 256  # serving.max_item_id_len: an id longer than serving accepts could never be served
    max_title_chars: int = 1_000
    max_body_chars: int = 20_000  # the encoder reads the first few dozen tokens; more is a mistake upstream
    max_tags: int = 64
    max_tag_chars: int = 100
    max_items: int = 100_000  # one call; more items go in several files


class ItemsRefused(ValueError):
    """The file is refused whole; ``problems`` lists every one found."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__(f"{source}: {len(problems)} problem(s), nothing was written:\n  " + "\n  ".join(shown))


def _rows_jsonl(path: Path, problems: list[str]) -> list[dict]:
    rows = []
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"row {n}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"row {n}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"row {n}: a JSON object per line is expected, got {type(obj).__name__}")
            continue
        rows.append({"_row": n, **obj})
    return rows


def _rows_frame(df: pd.DataFrame) -> list[dict]:
    return [{"_row": n, **rec} for n, rec in enumerate(df.to_dict("records"), start=1)]


def read_items_file(path: str | Path) -> tuple[list[dict], list[str]]:
    """The file's rows as dicts (``_row``: the row number) and the problems reading it."""
    path = Path(path)
    if not path.is_file():
        raise ItemsRefused(str(path), [f"no such file: {path}"])
    problems: list[str] = []
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _rows_jsonl(path, problems), problems
    if suffix == ".csv":
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n")  # the header is line 1, the first item row 1
            raise ItemsRefused(str(path), [f"row {line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8"]) from None
        return _rows_frame(pd.read_csv(path, dtype=str, keep_default_na=False)), problems
    if suffix == ".parquet":
        return _rows_frame(pd.read_parquet(path)), problems
    raise ItemsRefused(str(path), [f"unknown file type {suffix!r}: give .jsonl, .csv or .parquet"])


def _str_list(value, field: str, row: int, problems: list[str]) -> list[str] | None:
    if value is None or (isinstance(value, float) and value != value):
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    problems.append(f"row {row}: field '{field}' must be a list of strings or a comma-separated string")
    return None


def _text(value, field: str, row: int, limit: int, problems: list[str], required: bool) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        value = ""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"row {row}: field '{field}' is not UTF-8; re-encode it as UTF-8")
            return None
    if not isinstance(value, str):
        problems.append(f"row {row}: field '{field}' must be a string, got {type(value).__name__}")
        return None
    if required and not value.strip():
        problems.append(f"row {row}: field '{field}' is empty; the item encoder needs its text")
        return None
    if len(value) > limit:
        problems.append(f"row {row}: field '{field}' has {len(value):,} characters, more than {limit:,}; shorten it")
        return None
    return value


def check_items(rows: list[dict], scenarios: list[str], known_ids: set[str] | None = None,
                limits: ItemLimits = ItemLimits(), source: str = "items") -> pd.DataFrame:
    """The rows as a catalogue frame (COLUMNS), or ItemsRefused listing every problem."""
    problems: list[str] = []
    out: list[dict] = []
    seen: dict[str, int] = {}
    known_ids = known_ids or set()
    if len(rows) > limits.max_items:
        raise ItemsRefused(source, [f"{len(rows):,} items in one call, more than {limits.max_items:,}; split the file"])
    for r in rows:
        n = r["_row"]
        extra = sorted(set(r) - set(COLUMNS) - {"_row"})
        if extra:
            problems.append(f"row {n}: unknown field(s) {extra}; the fields are {list(COLUMNS)}")
        iid = r.get("item_id")
        if isinstance(iid, (int,)) and not isinstance(iid, bool):
            iid = str(iid)
        if not isinstance(iid, str) or not iid.strip():
            problems.append(f"row {n}: field 'item_id' is missing or empty")
            iid = None
        elif iid != iid.strip() or any(c in iid for c in "\r\n\t"):
            problems.append(f"row {n}: field 'item_id' {iid[:64]!r} has surrounding whitespace or control characters")
            iid = None
        elif len(iid) > limits.max_id_len:
            problems.append(f"row {n}: field 'item_id' has {len(iid)} characters, more than {limits.max_id_len}")
            iid = None
        elif iid in seen:
            problems.append(f"row {n}: field 'item_id' {iid[:64]!r} duplicates row {seen[iid]}")
            iid = None
        elif iid in known_ids:
            problems.append(f"row {n}: field 'item_id' {iid[:64]!r} is already in the catalogue; an item id is added once "
                            "(changed text of a known item reaches the model at its next training)")
            iid = None
        else:
            seen[iid] = n
        title = _text(r.get("title"), "title", n, limits.max_title_chars, problems, required=True)
        body = _text(r.get("body"), "body", n, limits.max_body_chars, problems, required=False)
        tags = _str_list(r.get("tags"), "tags", n, problems)
        if tags is not None and (len(tags) > limits.max_tags or any(len(t) > limits.max_tag_chars for t in tags)):
            problems.append(f"row {n}: field 'tags': at most {limits.max_tags} tags of at most {limits.max_tag_chars} characters")
            tags = None
        scen = _str_list(r.get("scenarios"), "scenarios", n, problems)
        if scen is not None:
            unknown = [s for s in scen if s not in scenarios]
            if not scen:
                problems.append(f"row {n}: field 'scenarios' is empty; name at least one of {scenarios}")
                scen = None
            elif unknown:
                problems.append(f"row {n}: field 'scenarios' names unknown scenario(s) {unknown}; the served ones are {scenarios}")
                scen = None
        if None not in (iid, title, body, tags, scen):
            out.append({"item_id": iid, "title": title, "body": body, "tags": tags, "scenarios": list(dict.fromkeys(scen))})
    if not rows:
        problems.append("the file holds no items")
    if problems:
        raise ItemsRefused(source, problems)
    return pd.DataFrame(out, columns=list(COLUMNS))


def load_new_items(path: str | Path, scenarios: list[str], known_ids: set[str] | None = None,
                   limits: ItemLimits = ItemLimits()) -> pd.DataFrame:
    rows, problems = read_items_file(path)
    try:
        df = check_items(rows, scenarios, known_ids, limits, source=str(path))
    except ItemsRefused as e:
        problems = problems + e.problems
    else:
        if not problems:
            return df
    raise ItemsRefused(str(path), problems)
