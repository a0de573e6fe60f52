"""Catalogue sources for the in-process index builder (`CatalogIndexSource`).

Until the indexer's Redis layout is ready, the service builds its index from one of these:

- `planted:N[:SEED]`: the planted demo world of `worlds.planted` with N ads (matches its schema);
- a `.safetensors` file with `item_ids` (N,), `dense` (N, item_dense_dim) and one `sparse.<name>`
  tensor (N,) per item sparse feature (`save_catalog` writes one).
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from hsnn.features import ItemBatch
from retrieval_api.state import Catalog, CatalogSource


def planted_catalog(num_items: int, seed: int = 0) -> Catalog:
    from worlds.planted import make_world

    world = make_world(num_items=num_items, seed=seed)
    return Catalog(item_ids=world.item_ids, items=world.items)


def save_catalog(catalog: Catalog, path: str | Path) -> None:
    tensors = {"item_ids": catalog.item_ids.clone(), "dense": catalog.items.dense.contiguous()}
    tensors |= {f"sparse.{name}": ids.clone() for name, ids in catalog.items.sparse.items()}  # no shared storage
    save_file(tensors, str(path))


def load_catalog(path: str | Path) -> Catalog:
    tensors = load_file(str(path))
    missing = {"item_ids", "dense"} - set(tensors)
    if missing:
        raise ValueError(f"{path}: catalogue file lacks {sorted(missing)}")
    sparse = {name.removeprefix("sparse."): t.long() for name, t in tensors.items() if name.startswith("sparse.")}
    item_ids = tensors["item_ids"].long()
    for name, tensor in [("dense", tensors["dense"]), *sparse.items()]:
        if len(tensor) != len(item_ids):
            raise ValueError(f"{path}: {name} has {len(tensor)} rows, item_ids has {len(item_ids)}")
    return Catalog(item_ids=item_ids, items=ItemBatch(dense=tensors["dense"].float(), sparse=sparse))


def catalog_source(spec: str) -> CatalogSource:
    """The `catalog` setting as a `CatalogSource` (read again at every load, so a replaced file is picked up)."""
    if spec.startswith("planted:"):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]) or int(parts[1]) < 1:
            raise ValueError(f"catalog {spec!r}: expected planted:N or planted:N:SEED with N >= 1")
        num_items, seed = int(parts[1]), int(parts[2]) if len(parts) == 3 else 0
        cached: list[Catalog] = []

        def planted() -> Catalog:
            if not cached:  # deterministic: build once
                cached.append(planted_catalog(num_items, seed))
            return cached[0]

        return planted
    path = Path(spec)
    if path.suffix != ".safetensors":
        raise ValueError(f"catalog {spec!r}: expected planted:N[:SEED] or a .safetensors file")
    return lambda: load_catalog(path)
