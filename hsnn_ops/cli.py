"""`hsnn-ops`: the operator's command for snapshots, the Redis index and health.

    hsnn-ops snapshots list|show V|promote V|rollback [--to V]
    hsnn-ops index show|rebuild|rollback
    hsnn-ops health [--api URL]

Where things are comes from flags, else `HSNN_OPS_*` environment variables, else the "ops" section of
`$HSNN_CONFIG_FILE`, else what the service containers set (`HSNN_INDEXER_STORE_DIR` or
`HSNN_TRAINER_STORE_DIR`; the indexer's `REDIS_URL` and `KEY_PREFIX`), so inside the trainer or indexer
container no flag is needed. Every command prints a short
human summary, or with `--json` one JSON document on stdout. Exit status: 0 done, 1 refused or unhealthy,
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field

from streaming.settings import ServiceSettings

EXIT_OK, EXIT_REFUSED = 0, 1


class OpsSettings(ServiceSettings):
    """Where the store, Redis and the API are; unset fields fall back to the indexer's settings."""

    section: ClassVar[str] = "ops"
    model_config = ServiceSettings.model_config | {"env_prefix": "HSNN_OPS_"}

    store_dir: str | None = Field(None, description="Snapshot store root (default: HSNN_INDEXER_STORE_DIR).")
    redis_url: str | None = Field(None, description="Redis holding the index (default: HSNN_INDEXER_REDIS_URL).")
    key_prefix: str | None = Field(None, description="Key prefix of the index (default: HSNN_INDEXER_KEY_PREFIX).")
    api_url: str = Field("http://127.0.0.1:8000", description="Base URL of one retrieval API replica.")
    timeout_s: float = Field(5.0, gt=0, description="HTTP timeout of calls to the API.")


class Refused(Exception):
    """The command cannot do what was asked (unknown version, nothing to roll back to); exit status 1."""


@dataclass
class Context:
    settings: OpsSettings
    as_json: bool

    def store(self) -> Any:
        """The store named by the flag, else the one the service container at hand mounts."""
        from streaming.snapshots import SnapshotStore

        root = (
            self.settings.store_dir
            or os.environ.get("HSNN_INDEXER_STORE_DIR")
            or os.environ.get("HSNN_TRAINER_STORE_DIR")
            or self._indexer().store_dir
        )
        return SnapshotStore(root)

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.settings.redis_url or self._indexer().redis_url, socket_timeout=10)

    def key_prefix(self) -> str:
        return self.settings.key_prefix or self._indexer().key_prefix

    def _indexer(self) -> Any:
        from indexer.settings import IndexerSettings

        return IndexerSettings()


# ------------------------------------------------------------------------------------------ snapshots


def _snapshot_row(store: Any, version: int, promoted: int | None) -> dict[str, Any]:
    manifest = store.manifest(version)
    return {
        "version": version,
        "promoted": version == promoted,
        "created_at": manifest.created_at,
        "age_s": round(time.time() - manifest.created_at, 1),
        "parent": manifest.parent,
        "eval_metrics": manifest.eval_metrics,
    }


def snapshots_list(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    store = ctx.store()
    pointer = store.promoted()
    promoted = pointer.version if pointer else None
    return {
        "store": str(store.root),
        "promoted": promoted,
        "snapshots": [_snapshot_row(store, v, promoted) for v in reversed(store.versions())],
    }


def snapshots_show(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    from streaming.snapshots import CorruptSnapshot

    store = ctx.store()
    try:
        manifest = store.verify(args.version) if args.verify else store.manifest(args.version)
    except CorruptSnapshot as err:
        raise Refused(str(err)) from err
    pointer = store.promoted()
    return manifest.model_dump(mode="json") | {
        "promoted": bool(pointer and pointer.version == args.version),
        "verified": args.verify,
    }


def _promote(store: Any, version: int, verb: str) -> dict[str, Any]:
    from streaming.snapshots import CorruptSnapshot

    before = store.promoted()
    try:
        store.verify(version)  # never point readers at a damaged snapshot
        pointer = store.promote(version)
    except CorruptSnapshot as err:
        raise Refused(f"not promoting {version}: {err}") from err
    return {
        "action": verb,
        "promoted": pointer.version,
        "previous": before.version if before else None,
        "promoted_at": pointer.promoted_at,
        "note": "the trainer promotes every snapshot that passes its gate: stop it to keep this pointer",
    }


def snapshots_promote(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    return _promote(ctx.store(), args.version, "promote")


def snapshots_rollback(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    store = ctx.store()
    pointer = store.promoted()
    if args.to is not None:
        target = args.to
    else:
        if pointer is None:
            raise Refused("nothing is promoted: nothing to roll back from")
        older = [v for v in store.versions() if v < pointer.version]
        if not older:
            raise Refused(f"no snapshot older than the promoted {pointer.version} is kept in {store.root}")
        target = older[-1]
    return _promote(store, target, "rollback")


# ------------------------------------------------------------------------------------------ index


def index_show(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    from streaming import index_store

    redis, prefix = ctx.redis(), ctx.key_prefix()
    current = index_store.current_version(redis, prefix)
    previous = index_store.previous_version(redis, prefix)

    def describe(version: int | None) -> dict[str, Any] | None:
        if version is None:
            return None
        try:
            meta = index_store.read_meta(redis, version, prefix)
        except index_store.IndexNotFound:
            return {"version": version, "exists": False}
        keep = ("model_version", "num_items", "created_at", "skipped_ads")
        return {"version": version, "exists": True} | {k: meta[k] for k in keep if k in meta}

    return {"key_prefix": prefix, "current": describe(current), "previous": describe(previous)}


def index_rollback(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    from streaming import index_store

    redis, prefix = ctx.redis(), ctx.key_prefix()
    before = index_store.current_version(redis, prefix)
    now = index_store.rollback(redis, prefix)
    if now is None or now == before:
        raise Refused(f"no previous index version to roll back to (current {before})")
    return {"action": "rollback", "current": now, "previous": before}


def index_rebuild(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    """Rebuild the index for the promoted model now, as the indexer would on a promotion."""
    from hsnn.model import HSNN
    from indexer.service import Indexer
    from indexer.settings import IndexerSettings
    from streaming.snapshots import CorruptSnapshot

    overrides = {
        name: value
        for name, value in (
            ("store_dir", ctx.settings.store_dir),
            ("redis_url", ctx.settings.redis_url),
            ("key_prefix", ctx.settings.key_prefix),
        )
        if value is not None
    }
    indexer = Indexer(IndexerSettings(**overrides, metrics_port=0))
    try:
        pointer = indexer.store.promoted()
        if pointer is None:
            raise Refused("nothing is promoted: no model to build an index for")
        try:
            model, _ = indexer.store.load(pointer.version)
        except CorruptSnapshot as err:
            raise Refused(f"promoted snapshot {pointer.version} is damaged: {err}") from err
        if not isinstance(model, HSNN):
            raise Refused(f"promoted snapshot {pointer.version} holds a {type(model).__name__}, not an HSNN")
        started = time.monotonic()
        version = indexer.rebuild(model, pointer.version)
        if version is None:
            raise Refused("the rebuild flipped nothing live (empty catalogue, or another indexer moved the pointer)")
        return {
            "action": "rebuild",
            "index_version": version,
            "model_version": pointer.version,
            "seconds": round(time.monotonic() - started, 2),
        }
    finally:
        indexer.close()


# ------------------------------------------------------------------------------------------ health


def health(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    """What the API serves and how fresh it is, next to what the store has promoted."""
    import httpx

    url = ctx.settings.api_url.rstrip("/")
    report: dict[str, Any] = {"api": url}
    try:
        answer = httpx.get(f"{url}/status.json", timeout=ctx.settings.timeout_s)
        answer.raise_for_status()
        status = answer.json()
    except httpx.HTTPError as err:
        report |= {"healthy": False, "problem": f"API unreachable: {err}"}
        return report
    served = status.get("served", {})
    promoted = status.get("promoted", {})
    report |= {
        "ready": bool(served.get("ready")),
        "model_version": served.get("model_version"),
        "index_version": served.get("index_version"),
        "snapshot_age_s": served.get("snapshot_age_s"),
        "promoted_version": promoted.get("version"),
        "requests": status.get("requests", {}),
    }
    problems = []
    if not report["ready"]:
        problems.append("API not ready: no model/index pair loaded")
    elif report["promoted_version"] is not None and report["model_version"] != report["promoted_version"]:
        problems.append(f"serves model {report['model_version']}, promoted is {report['promoted_version']}")
    age = report["snapshot_age_s"]
    if age is not None and age > args.max_age_s:
        problems.append(f"served snapshot is {age:.0f}s old (more than {args.max_age_s:.0f}s)")
    report |= {"healthy": not problems, "problem": "; ".join(problems) or None}
    return report


# ------------------------------------------------------------------------------------------ output


def _human(command: str, result: dict[str, Any]) -> str:
    """A few lines an operator reads at a glance (the JSON has everything)."""
    if command == "snapshots list":
        lines = [f"store {result['store']}  promoted: {result['promoted']}"]
        for row in result["snapshots"]:
            mark = "*" if row["promoted"] else " "
            ne = row["eval_metrics"].get("ne")
            ne_text = f"  ne {ne:.4f}" if isinstance(ne, int | float) else ""
            lines.append(f"{mark} v{row['version']:<6} {row['age_s']:>10.0f}s old{ne_text}")
        return "\n".join(lines)
    if command == "health":
        state = "HEALTHY" if result.get("healthy") else f"UNHEALTHY: {result.get('problem')}"
        if "model_version" not in result:
            return state
        age = result["snapshot_age_s"]
        age_text = "-" if age is None else f"{age:.0f}s"
        return (
            f"{state}\nAPI {result['api']}: model {result['model_version']} / index {result['index_version']}, "
            f"snapshot {age_text} old, promoted {result['promoted_version']}"
        )
    return "\n".join(f"{key}: {json.dumps(value)}" for key, value in result.items())


Handler = Callable[[Context, argparse.Namespace], dict[str, Any]]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    common.add_argument("--store-dir", help="snapshot store root [env: HSNN_OPS_STORE_DIR]")
    common.add_argument("--redis-url", help="Redis holding the index [env: HSNN_OPS_REDIS_URL]")
    common.add_argument("--key-prefix", help="key prefix of the index [env: HSNN_OPS_KEY_PREFIX]")
    common.add_argument("--api-url", help="base URL of a retrieval API replica [env: HSNN_OPS_API_URL]")

    parser = argparse.ArgumentParser(
        prog="hsnn-ops", description="Inspect and steer HSNN-Serve: snapshots, the Redis index, health."
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="{snapshots,index,health}")

    def add(sub: Any, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        command.set_defaults(handler=handler)
        return command

    snapshots = groups.add_parser("snapshots", help="the trainer's snapshot store and its PROMOTED pointer")
    snapshot_commands = snapshots.add_subparsers(dest="command", required=True)
    add(snapshot_commands, "list", snapshots_list, "versions kept in the store, newest first; * marks the promoted")
    show = add(snapshot_commands, "show", snapshots_show, "one snapshot's manifest")
    show.add_argument("version", type=int)
    show.add_argument("--verify", action="store_true", help="also recompute every file's sha256")
    promote = add(snapshot_commands, "promote", snapshots_promote, "point readers at VERSION (verified first)")
    promote.add_argument("version", type=int)
    rollback = add(
        snapshot_commands, "rollback", snapshots_rollback, "promote the newest snapshot older than the promoted one"
    )
    rollback.add_argument("--to", type=int, help="promote this version instead")

    index = groups.add_parser("index", help="the index the indexer wrote to Redis")
    index_commands = index.add_subparsers(dest="command", required=True)
    add(index_commands, "show", index_show, "current and previous index versions and what they were built from")
    add(index_commands, "rebuild", index_rebuild, "rebuild the index for the promoted model now and flip to it")
    add(index_commands, "rollback", index_rollback, "swap the current and previous index versions")

    check = add(groups, "health", health, "what the API serves, how fresh, against the promoted snapshot")
    check.add_argument("--max-age-s", type=float, default=3600.0, help="a served snapshot older than this is unhealthy")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {"store_dir": args.store_dir, "redis_url": args.redis_url, "key_prefix": args.key_prefix}
    flags["api_url"] = args.api_url
    settings = OpsSettings(**{name: value for name, value in flags.items() if value is not None})
    ctx = Context(settings, args.json)
    command = " ".join(filter(None, (args.group, getattr(args, "command", None))))
    try:
        result = args.handler(ctx, args)
        status = EXIT_OK if result.get("healthy", True) else EXIT_REFUSED
    except Refused as err:
        result, status = {"error": str(err)}, EXIT_REFUSED
    if ctx.as_json:
        print(json.dumps(result, indent=2, default=str))
    elif "error" in result:
        print(f"hsnn-ops {command}: {result['error']}", file=sys.stderr)
    else:
        print(_human(command, result))
    return status
