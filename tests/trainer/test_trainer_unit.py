"""Pure helpers of the online trainer (no Kafka, no model)."""

from __future__ import annotations

from pathlib import Path

from streaming.events import ItemEvent, ItemFeatures
from trainer.bookkeeping import OffsetBook, consumed_ids, is_held_out, truncate_lines
from trainer.catalogue import Catalogue


def test_held_out_rule_is_deterministic_and_about_one_in_n() -> None:
    ids = [f"imp-{i}" for i in range(20_000)]
    first = [is_held_out(i, 20) for i in ids]
    assert first == [is_held_out(i, 20) for i in ids]  # same answer every call (and every process: no salted hash)
    assert 0.04 < sum(first) / len(ids) < 0.06
    assert not any(is_held_out(i, 0) for i in ids[:100])
    assert all(is_held_out(i, 1) for i in ids[:100])
    assert sum(is_held_out(f"x{i}", 2) for i in range(1000)) in range(440, 561)


def test_offset_book_advances_never_backwards_and_round_trips() -> None:
    book = OffsetBook()
    book.advance("imp", 0, 10)
    book.advance("imp", 0, 4)  # a late, lower offset does not move it back
    book.advance("imp", 1, 0)
    book.set("items", 0, 7)
    assert book.get("imp", 0) == 11 and book.get("imp", 1) == 1 and book.get("imp", 2) is None
    manifest = book.as_manifest()
    assert manifest == {"imp": {"0": 11, "1": 1}, "items": {"0": 7}}
    again = OffsetBook.from_manifest(manifest)
    assert again.topic("imp") == {0: 11, 1: 1} and again.as_manifest() == manifest


def test_truncate_lines_keeps_exactly_the_snapshot_count(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    assert truncate_lines(path, 5) == 0 and path.read_bytes() == b""
    path.write_text('"a"\n"b"\n"c"\n"d"\n"e')  # torn last line after a crash
    assert truncate_lines(path, 3) == 3
    assert consumed_ids(path) == ["a", "b", "c"]
    assert truncate_lines(path, 10) == 3  # fewer lines than the snapshot claims: keep what is there
    path.write_text('"a"\n"b"\n"c')
    assert truncate_lines(path, 10) == 2 and path.read_text() == '"a"\n"b"\n'


def _item(ad: int, sequence: int, op: str = "create") -> ItemEvent:
    features = None if op == "expire" else ItemFeatures(dense=[float(sequence)] * 4)
    return ItemEvent(op=op, ad_id=ad, event_time=1.0e9 + sequence, sequence=sequence, features=features)


def test_catalogue_applies_supersedes_and_expire() -> None:
    cat = Catalogue()
    assert cat.apply(_item(1, 2))
    assert not cat.apply(_item(1, 1))  # older, late: dropped
    assert cat.live[1].dense[0] == 2.0 and cat.why_missing(1) is None
    assert cat.apply(_item(1, 3, "expire"))
    assert cat.why_missing(1) == "unknown ad 1 (expired)" and 1 not in cat.live
    assert not cat.apply(_item(1, 2, "update"))  # cannot revive with a lower sequence
    assert cat.apply(_item(1, 4, "update")) and cat.live[1].dense[0] == 4.0
    assert cat.why_missing(9) == "unknown ad 9"


def test_snapshot_notice_carries_what_a_reader_needs():
    import json

    from streaming.snapshots import Manifest, Pointer
    from trainer.publisher import snapshot_notice

    manifest = Manifest(version=7, created_at=100.0, event_time_watermark=90.0, eval_metrics={"ne": 0.8})
    notice = json.loads(snapshot_notice(Pointer(version=7, promoted_at=101.0), manifest))
    assert notice == {
        "version": 7,
        "promoted_at": 101.0,
        "created_at": 100.0,
        "event_time_watermark": 90.0,
        "eval_metrics": {"ne": 0.8},
    }
