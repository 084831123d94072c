"""The HTML reports' shared layout: Jinja2 templates (one base, one per report) and filters."""

from redrec.reports.render import render

__all__ = ["render"]
