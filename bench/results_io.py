"""Writing a benchmark's results: one JSON file a reader can check, one Markdown summary beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_results"]


def write_results(out: str | Path, stem: str, report: dict[str, Any], markdown: str) -> Path:
    """Write ``<out>/<stem>.json`` and ``<out>/<stem>.md``, print the summary, return the JSON path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / stem}.json and .md")
    return json_path
