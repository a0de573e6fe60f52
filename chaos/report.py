"""Experiment results: reports/reliability.json (merged by experiment key) and the table in docs/reliability.md."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
REPORT_PATH = REPO / "reports" / "reliability.json"
DOCS_PATH = REPO / "docs" / "reliability.md"
TABLE_START = "<!-- chaos:table:start (written by python -m chaos; do not edit by hand) -->"
TABLE_END = "<!-- chaos:table:end -->"


@dataclass
class ExperimentResult:
    """What one experiment did and found. `lost`/`duplicated` count records; `http_5xx`/`timeouts` answers."""

    experiment: str
    title: str
    command: str
    runs: int = 0
    faults_injected: int = 0
    lost: int = 0
    duplicated: int = 0
    http_5xx: int = 0
    timeouts: int = 0
    passed: bool = False
    checks: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    finished_at: float = 0.0

    def finish(self, passed: bool, started: float) -> ExperimentResult:
        self.passed = passed
        self.duration_s = round(time.monotonic() - started, 2)
        self.finished_at = round(time.time(), 1)
        return self


def record(result: ExperimentResult, report_path: Path = REPORT_PATH, docs_path: Path | None = DOCS_PATH) -> None:
    """Merge `result` into the JSON report under its experiment key, then rewrite the docs table from the JSON."""
    report: dict[str, Any] = {}
    if report_path.exists():
        report = json.loads(report_path.read_text())
    report.setdefault("experiments", {})[result.experiment] = asdict(result)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if docs_path is not None and docs_path.exists():
        write_table(report, docs_path)


def table(report: dict[str, Any]) -> str:
    lines = [
        "| experiment | what | runs | faults injected | lost | duplicated | 5xx | timeouts | pass | command |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for key in sorted(report.get("experiments", {}), key=_order):
        r = report["experiments"][key]
        lines.append(
            f"| {key.upper()} | {r['title']} | {r['runs']} | {r['faults_injected']} | {r['lost']} | "
            f"{r['duplicated']} | {r['http_5xx']} | {r['timeouts']} | {'yes' if r['passed'] else '**no**'} | "
            f"`{r['command']}` |"
        )
    return "\n".join(lines)


def write_table(report: dict[str, Any], docs_path: Path) -> None:
    text = docs_path.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        return
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    docs_path.write_text(f"{head}{TABLE_START}\n{table(report)}\n{TABLE_END}{tail}")


def _order(key: str) -> tuple[int, str]:
    digits = "".join(ch for ch in key if ch.isdigit())
    return (int(digits) if digits else 99, key)


def add_loop_options(parser: argparse.ArgumentParser, experiment: str) -> None:
    """The options every streaming-loop experiment takes: seed, broker, work directory, report key."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", help="a running broker (default: start one with devservers)")
    parser.add_argument("--work", help="work directory (default: a new temp dir, removed when the run passes)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--report-key", default=experiment, help="key in reports/reliability.json ('' = do not record)")


def experiment_parser(experiment: str, description: str) -> argparse.ArgumentParser:
    """The parser of `python -m chaos <experiment>`; `parse_loop_args` adds the options every loop takes."""
    return argparse.ArgumentParser(prog=f"python -m chaos {experiment}", description=description)


def add_item_post_options(parser: argparse.ArgumentParser, posters: int, batch: int, posters_help: str) -> None:
    """The item-post load of an experiment: concurrent posters of `batch`-event bodies to /items/events, each
    answered within the API's Kafka acknowledgement timeout."""
    parser.add_argument("--posters", type=int, default=posters, help=posters_help)
    parser.add_argument("--batch", type=int, default=batch, help="events per item post")
    parser.add_argument("--ack-timeout", type=float, default=2.0, help="the API's kafka_ack_timeout_s")


def parse_loop_args(parser: argparse.ArgumentParser, experiment: str, argv: list[str]) -> argparse.Namespace:
    """Add the loop options, parse `argv`, and keep the command line that reproduces the run (`args.command`)."""
    add_loop_options(parser, experiment)
    args = parser.parse_args(argv)
    args.command = f"python -m chaos {experiment} " + " ".join(argv) if argv else f"python -m chaos {experiment}"
    return args


def parse_options(
    experiment: str, description: str, options: Sequence[tuple[str, type, Any, str]], argv: list[str]
) -> argparse.Namespace:
    """`parse_loop_args` for a parser whose options are (name, type, default, help) rows."""
    parser = experiment_parser(experiment, description)
    for name, kind, default, text in options:
        parser.add_argument(name, type=kind, default=default, help=text)
    return parse_loop_args(parser, experiment, argv)


def loop_result(
    args: argparse.Namespace,
    experiment: str,
    title: str,
    started: float,
    work: Path,
    checks: dict[str, Any],
    details: dict[str, Any],
    *,
    faults_injected: int,
    lost: int,
    duplicated: int,
) -> ExperimentResult:
    """The result of one run of a loop experiment (passed when every check holds), its work dir tidied."""
    result = ExperimentResult(
        experiment=args.report_key or experiment,
        title=title,
        command=args.command,
        runs=1,
        faults_injected=faults_injected,
        lost=lost,
        duplicated=duplicated,
        checks={**checks, "details": details},
    ).finish(all(checks.values()), started)
    return tidy_work_dir(result, work, args.keep)


def finish(result: ExperimentResult, report_key: str) -> int:
    """Record the result (unless the report key is empty), print it, and turn pass/fail into an exit code."""
    if report_key:
        record(result)
    print(json.dumps(asdict(result), indent=2, default=str))
    return 0 if result.passed else 1


def tidy_work_dir(result: ExperimentResult, work: Path, keep: bool) -> ExperimentResult:
    """A passed run leaves nothing behind (unless kept); a failed one names its work directory for the post-mortem
    on stderr (not in the report: a machine's temporary path means nothing in reports/)."""
    if not keep and result.passed:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"{result.experiment}: work directory kept at {work}", file=sys.stderr)
    return result
