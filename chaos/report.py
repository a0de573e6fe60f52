"""Results of the fault-injection experiments: reports/reliability.json (merged by key) and its table.

The JSON is the record; the table in docs/reliability.md between the two markers is rendered from
it, so every experiment (whoever wrote it) shows up the same way and a rerun replaces its own row.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REPORT_JSON = REPO / "reports" / "reliability.json"
DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- chaos-results:begin -->", "<!-- chaos-results:end -->"
COLUMNS = ("experiment", "runs", "faults injected", "lost", "duplicated", "5xx", "passed", "command")


def record(key: str, result: dict[str, Any], report: Path = REPORT_JSON, doc: Path = DOC) -> None:
    """Store `result` under `key` (replacing an earlier run of it) and re-render the table.

    `result` should carry: title, runs, faults (a short text), lost, duplicated, http_5xx (None when the
    experiment serves no HTTP), passed, command, and any experiment-specific figures.
    """
    data = json.loads(report.read_text()) if report.exists() else {}
    data[key] = {**result, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report.parent.mkdir(parents=True, exist_ok=True)
    _write(report, json.dumps(data, indent=2, sort_keys=True) + "\n")
    render_table(data, doc)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return str(value).replace("|", "\\|")


def render_table(data: dict[str, dict[str, Any]], doc: Path = DOC) -> None:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for key in sorted(data, key=lambda k: (len(k), k)):
        r = data[key]
        cells = [
            f"{key.upper()}: {r.get('title', '')}",
            r.get("runs"),
            r.get("faults"),
            r.get("lost"),
            r.get("duplicated"),
            r.get("http_5xx"),
            r.get("passed"),
            f"`{r['command']}`" if r.get("command") else None,
        ]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    table = "\n".join(rows)
    text = doc.read_text() if doc.exists() else _NEW_DOC
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    _write(doc, f"{head}{BEGIN}\n{table}\n{END}{tail}")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_NEW_DOC = """# Reliability: fault-injection experiments

`python -m chaos <experiment>` runs one experiment against real Kafka and Redis (devservers) and
records it in reports/reliability.json; the table below is rendered from that file.
"""
