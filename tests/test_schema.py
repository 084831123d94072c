import pandas as pd
import pytest

from redrec.schema import SchemaError, validate_events, validate_items


def events(**over):
    df = pd.DataFrame(
        {"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "a"], "scenario": ["homefeed", "ads", "search"],
         "action": ["click", "like", "click"], "ts": [10, 20, 5]}
    )
    for k, v in over.items():
        df[k] = v
    return df


def test_valid_events_pass_through_unchanged():
    out, rep = validate_events(events(), "ev.parquet")
    assert len(out) == 3 and rep.rows_kept == 3 and not rep.dropped
    assert out["ts"].dtype == "int64"


def test_strict_error_names_file_row_and_field():
    with pytest.raises(SchemaError) as e:
        validate_events(events(ts=[10, "yesterday", 5]), "ev.parquet")
    msg = str(e.value)
    assert "ev.parquet: row 1, field 'ts'" in msg and "unix timestamp" in msg
    assert e.value.problems[0].row == 1


def test_drop_mode_counts_every_dropped_row_by_reason():
    df = events(user_id=["u1", "", "u2"], ts=[10, 20, -1])
    out, rep = validate_events(df, "ev.csv", on_error="drop")
    assert len(out) == 1 and rep.rows_in == 3 and rep.rows_kept == 1
    assert rep.dropped == {"empty user_id": 1, "bad ts": 1}
    assert "3 rows read, 1 kept" in rep.summary()


def test_unknown_item_is_refused_with_the_fix():
    with pytest.raises(SchemaError, match="field 'item_id': item not in the catalogue"):
        validate_events(events(), "ev", known_items={"a"})


def test_missing_column_is_named():
    with pytest.raises(SchemaError, match="field 'ts': column missing"):
        validate_events(events().drop(columns=["ts"]), "ev")


def test_items_validation_reports_duplicates_scenarios_and_images():
    items = pd.DataFrame(
        {"item_id": ["a", "a", "c", "d", "e"], "title": ["A", "A2", "C", "", "E"], "body": None,
         "tags": [["x"], "y,z", None, [], "w"],
         "scenarios": [["homefeed"], ["ads"], ["moon"], ["ads"], "homefeed|ads"],
         "image": [[0.1, 0.2], None, None, None, [float("nan"), 1.0]]}
    )
    with pytest.raises(SchemaError) as e:
        validate_items(items, "items.parquet", scenarios=["homefeed", "ads"])
    fields = {(p.row, p.field) for p in e.value.problems}
    assert fields == {(1, "item_id"), (2, "scenarios"), (3, "title"), (4, "image")}
    out, rep = validate_items(items, "items.parquet", scenarios=["homefeed", "ads"], on_error="drop")
    assert out["item_id"].tolist() == ["a"] and rep.rows_in == 5 and sum(rep.dropped.values()) == 4
