"""The trainer's item catalogue: the compacted items topic, read from the start, as ad id -> newest event."""

from __future__ import annotations

from dataclasses import dataclass

from streaming.events import ItemEvent, ItemFeatures, supersedes


@dataclass
class CatalogueEntry:
    event: ItemEvent  # the newest applied event: its version is what `supersedes` compares against

    @property
    def features(self) -> ItemFeatures | None:
        return None if self.event.op == "expire" else self.event.features


class Catalogue:
    """ad id -> newest item event, applied with `streaming.events.supersedes` (expire keeps its version)."""

    def __init__(self) -> None:
        self.entries: dict[int, CatalogueEntry] = {}
        self.live: dict[int, ItemFeatures] = {}  # the mapping impressions_to_batch joins against

    def apply(self, event: ItemEvent) -> bool:
        current = self.entries.get(event.ad_id)
        if not supersedes(event, None if current is None else current.event):
            return False
        entry = CatalogueEntry(event)
        self.entries[event.ad_id] = entry
        if entry.features is None:
            self.live.pop(event.ad_id, None)
        else:
            self.live[event.ad_id] = entry.features
        return True

    def why_missing(self, ad_id: int) -> str | None:
        """None if the ad is live, else the dead-letter reason."""
        if ad_id in self.live:
            return None
        return f"unknown ad {ad_id} (expired)" if ad_id in self.entries else f"unknown ad {ad_id}"
