"""The pages at ``/errors/{code}``, which every problem's ``type`` links to.

Each page is rendered from the docstring of the error's class: that docstring is the guidance
for the code (what it means, and a ``Client:`` paragraph saying what to do), written in the
small Markdown subset below, and ``docs/errors.md`` carries the same text as its section for
the code. One source for both, compared by the test suite.

The subset: paragraphs separated by blank lines, ``- `` bullet lists (continuation lines
indented), ```code``` and ``**bold**``.
"""

from __future__ import annotations

import html
import inspect
import re

from otpgate.errors import PUBLIC_ERRORS, OtpgateError

_CODE_SPAN = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")

#: The page of each public error code.
BY_CODE: dict[str, type[OtpgateError]] = {cls.code: cls for cls in PUBLIC_ERRORS}


def guidance(error: type[OtpgateError]) -> str:
    """The guidance of an error class: its own docstring (never an inherited one), dedented."""
    doc = vars(error).get("__doc__")
    return inspect.cleandoc(doc) if doc else ""


def _inline(text: str) -> str:
    escaped = html.escape(text, quote=False)
    escaped = _CODE_SPAN.sub(r"<code>\1</code>", escaped)
    return _BOLD.sub(r"<strong>\1</strong>", escaped)


def markdown_to_html(text: str) -> str:
    """The Markdown subset of the guidance as HTML; everything else is escaped text."""
    parts: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        if lines and lines[0].startswith("- "):
            items: list[str] = []
            for line in lines:
                if line.startswith("- "):
                    items.append(line[2:].strip())
                elif items:
                    items[-1] += " " + line.strip()
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
        else:
            parts.append(f"<p>{_inline(' '.join(line.strip() for line in lines))}</p>")
    return "\n".join(parts)


def render(error: type[OtpgateError]) -> str:
    """The whole page of one error code."""
    code = html.escape(error.code)
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{error.status} {code} · otpgate</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;"
        "padding:0 1rem;line-height:1.5}code{background:#f3f3f3;padding:0 .2em}</style>"
        "</head><body>\n"
        f"<h1>{error.status} <code>{code}</code></h1>\n"
        f"<p><em>{html.escape(error.title)}</em></p>\n"
        f"{markdown_to_html(guidance(error))}\n"
        "</body></html>\n"
    )
