"""Reports: one self-contained HTML page for a circuit study (`render_report`, `write_report`), an index page of
every result under a folder (`write_index`, `render_index`; `pathlens report DIR`), and the studies the command
line runs as library calls (`circuit_study`, `demo_study`, `write_sweep`, `task_for`)."""

from pathlens.report.html import render_report, write_report
from pathlens.report.index import render_index, write_index
from pathlens.report.studies import (
    DemoStudy,
    SweepSummary,
    circuit_study,
    demo_study,
    plottable,
    task_for,
    write_sweep,
)

__all__ = [
    "DemoStudy",
    "SweepSummary",
    "circuit_study",
    "demo_study",
    "plottable",
    "render_index",
    "render_report",
    "task_for",
    "write_index",
    "write_report",
    "write_sweep",
]
