"""Seeing a run: progress, plots and the model card in the output directory.

(Integration point: `report_callbacks` are added to every Trainer; `write_run_report` runs at the end.)
"""

from __future__ import annotations


def report_callbacks(args) -> list:
    return []


def write_run_report(output_dir: str, **info) -> None:
    """Write the model card and plots for a finished run (filled in by the UX issue)."""
