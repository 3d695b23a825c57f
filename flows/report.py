"""Prefect artifacts for a build: the markdown run report and the table (content from cellm.report)."""

from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cellm.report import run_report_markdown, run_report_table


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower())).strip("-")[:100]


def create_run_artifacts(summary: dict) -> dict[str, str]:
    """Create the markdown report and the table artifact of one build; returns their keys."""
    base = artifact_key("build", str(summary.get("source_name", "")), str(summary.get("profile", "")))
    md_key, table_key = base + "-report", base + "-table"
    status = summary.get("status", "built")
    create_markdown_artifact(markdown=run_report_markdown(summary), key=md_key,
                             description=f"{summary.get('profile')} build of {summary.get('source')}: {status}")
    create_table_artifact(table=run_report_table(summary), key=table_key,
                          description=f"{summary.get('profile')}: bytes per scheme, gate checks, verdict")
    return {"markdown": md_key, "table": table_key}
