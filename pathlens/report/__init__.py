"""Reports: one self-contained HTML page for a circuit study (`render_report`, `write_report`)."""

from pathlens.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]
