"""``preftune report RUN_DIR``: the figures as PNG files and one self-contained HTML page.

Registering the subcommand imports nothing heavy; matplotlib loads only when a report is
written.
"""

from __future__ import annotations

import argparse


def _report(args: argparse.Namespace) -> int:
    from preftune.report.build import write_report

    report = write_report(args.run_dir)
    if report.collapse:
        print("warning: both log-probs fell while the reward margin grew (see the report)")
    print(f"report written to {report.html}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write an HTML report with figures for a training run",
        description="Write RUN_DIR/report.html (self-contained: figures inline, nothing "
        "loaded from the network) and the same figures as RUN_DIR/report/*.png.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory written by preftune train")
    parser.set_defaults(func=_report)
