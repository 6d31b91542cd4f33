"""The run report: figures of a training run and one self-contained HTML page.

- ``run_files``: reading a run directory (missing files and NaN strings tolerated).
- ``diagnostics``: the numbers behind warnings and counts (log-prob collapse, loss curve,
  regions), no drawing.
- ``plotting``, ``figures``, ``landscape``: the matplotlib figures.
- ``html``, ``sections``: the page.
- ``build``: ``write_report``, which puts them together; ``command``: ``preftune report``.

docs/report.md explains every figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from preftune.report.command import register

if TYPE_CHECKING:
    from preftune.report.build import Report


def write_report(run_dir: str | Path) -> Report:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/report/*.png``; see ``build.write_report``.

    Importing matplotlib is deferred to this call, so that importing preftune stays quick.
    """
    from preftune.report.build import write_report as write

    return write(run_dir)


__all__ = ["register", "write_report"]
