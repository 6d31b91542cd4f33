"""The HTML page: one self-contained file, every figure inline, every text escaped.

The page loads nothing: figures are base64 PNG data URIs, the style sheet is inline, there is
no script, and a Content-Security-Policy forbids any other source, so the report opens the
same offline, from an e-mail attachment or from a locked-down viewer.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Only inline styles and data: images; nothing may be fetched.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { margin: 0; background: #f6f6f4; color: #1d1d1d;
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1220px; margin: 0 auto; padding: 12px 16px 40px; }
header h1 { margin: 8px 0 4px; font-size: 24px; }
header p { margin: 2px 0; color: #444; }
nav { margin: 10px 0 4px; }
nav a { margin-right: 14px; color: #1a5fb4; text-decoration: none; }
section { background: #fff; border: 1px solid #ddd; border-radius: 6px;
          margin: 16px 0; padding: 10px 14px 14px; }
section h2 { margin: 4px 0 8px; font-size: 19px; }
.explain { margin: 4px 0 10px; color: #333; max-width: 1100px; }
.caption { margin: 6px 0 0; color: #444; font-size: 14px; max-width: 1100px; }
img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #d6d6d6; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0ee; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.box { border-left: 6px solid; border-radius: 4px; padding: 8px 12px; margin: 6px 0 10px; }
.box h3 { margin: 0 0 4px; font-size: 16px; }
.box p { margin: 4px 0; }
.warning { background: #fdecea; border-color: #b00020; }
.ok { background: #edf7ed; border-color: #2e7d32; }
.notice { background: #f3f3f3; border-color: #9e9e9e; }
table.samples { width: 100%; }
.samples td.text { white-space: pre-wrap; word-break: break-word; font-family: ui-monospace,
                   SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; width: 36%; }
.samples td.text:nth-child(2) { width: 24%; }
.samples td.text div.reward { font-family: system-ui, sans-serif; color: #555; margin-top: 6px;
                              border-top: 1px dashed #ccc; padding-top: 3px; }
.columns { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
h4 { margin: 10px 0 4px; font-size: 14px; }
section h3 { margin: 14px 0 6px; font-size: 16px; }
.config-columns > table { flex: 1 1 0; min-width: 0; }
.config td:first-child { font-family: ui-monospace, Menlo, Consolas, monospace; width: 45%; }
.config td:last-child { word-break: break-all; }
.changed { font-weight: 700; }
"""


@dataclass
class Section:
    """One block of the page; ``body`` is HTML that the caller has already escaped."""

    id: str
    title: str
    body: str


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def paragraph(text: str, css: str = "explain") -> str:
    return f'<p class="{css}">{esc(text)}</p>'


def box(kind: str, title: str, paragraphs: Iterable[str]) -> str:
    """A coloured note (``warning``, ``ok`` or ``notice``) of escaped paragraphs."""
    body = "".join(f"<p>{esc(p)}</p>" for p in paragraphs)
    return f'<div class="box {kind}" role="note"><h3>{esc(title)}</h3>{body}</div>'


def table(
    rows: Sequence[Sequence[object]],
    header: Sequence[str] | None = None,
    css: str = "",
    numeric: Sequence[int] = (),
) -> str:
    """An escaped table; columns listed in ``numeric`` are right-aligned."""
    head = ""
    if header:
        head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{esc(v)}</td>' if i in numeric else f"<td>{esc(v)}</td>"
            for i, v in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    css_attr = f' class="{css}"' if css else ""
    return f"<table{css_attr}>{head}{''.join(body)}</table>"


def page(title: str, header: str, sections: Sequence[Section]) -> str:
    """The whole document; ``header`` is escaped HTML placed above the navigation."""
    nav = "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in sections)
    blocks = "".join(
        f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>"
        f"<body><main><header>{header}<nav>{nav}</nav></header>{blocks}</main></body></html>\n"
    )
