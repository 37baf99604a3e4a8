"""The per-subject QC page: one self-contained HTML5 file linking PNG figures by relative path.

The page has no scripts and no external resources (styles are inline), so it opens from a
file system, an archive or a web server alike, as long as the figures stay next to it.
"""

from __future__ import annotations

import datetime as _dt
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..io.nifti import atomic_path

__all__ = [
    "BIDSIGNORE_PATTERNS",
    "ReportFigure",
    "AcquisitionSection",
    "render_report",
    "write_report",
    "method_summary",
]

#: ``.bidsignore`` lines that let the BIDS validator accept the reports in a derivatives dataset
#: (a directory pattern must not end in "/": the validator then still flags the folder itself).
BIDSIGNORE_PATTERNS: tuple[str, ...] = ("sub-*.html", "sub-*/figures")

_ENTITY_NAMES = {
    "sub": "Subject",
    "ses": "Session",
    "acq": "Acquisition",
    "run": "Run",
    "rec": "Reconstruction",
    "echo": "Echo",
}

#: Sidecar fields shown first, with their display names (units in brackets).
_SIDECAR_FIELDS: tuple[tuple[str, str], ...] = (
    ("Description", "Map"),
    ("Units", "Units"),
    ("InversionMethod", "Dipole inversion"),
    ("BackgroundFieldRemoval", "Background field removal"),
    ("Reference", "Susceptibility reference"),
    ("MagneticFieldStrength", "Field strength (T)"),
    ("EchoTime", "Echo times (s)"),
    ("SkullStripped", "Skull stripped"),
)

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1a1a1a; background: #fafafa; line-height: 1.45; }
header, main, footer { max-width: 1100px; margin: 0 auto; padding: 0 1.25rem; }
header { border-bottom: 3px solid #0072B2; padding-top: 1rem; }
h1 { font-size: 1.6rem; margin: 0.4rem 0; }
h2 { font-size: 1.3rem; border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2rem; }
h3 { font-size: 1.05rem; margin-bottom: 0.4rem; }
nav ul { padding-left: 1.2rem; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dl.meta dt { font-weight: 600; }
dl.meta dd { margin: 0; }
figure { margin: 1rem 0; background: #fff; border: 1px solid #ddd; padding: 0.5rem; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.9rem; color: #444; margin-top: 0.3rem; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 0.9em; word-break: break-all; }
.note { color: #8a4b00; }
footer { border-top: 1px solid #ccc; margin-top: 2rem; padding-top: 0.6rem; padding-bottom: 1.5rem;
         font-size: 0.9rem; color: #444; }
"""


@dataclass
class ReportFigure:
    """One PNG on the page: its path, the alt text (what it shows) and a caption."""

    path: Path
    alt: str
    caption: str = ""


@dataclass
class AcquisitionSection:
    """What the page shows for one acquisition.

    ``label`` is the acquisition's entity string (``sub-01_acq-ori1``); ``sidecar`` the Chimap
    JSON sidecar's fields; ``extra_methods`` further method lines (name -> text), e.g. from the
    mask and field map sidecars; ``roi_rows`` the rows of
    :func:`qsmflow.reports.figures.roi_statistics` (``None``: no segmentation); ``outputs`` the
    files the figures were drawn from; ``notes`` warnings shown in the section.
    """

    label: str
    figures: list[ReportFigure] = field(default_factory=list)
    sidecar: Mapping[str, Any] | None = None
    extra_methods: Mapping[str, str] = field(default_factory=dict)
    roi_rows: list[Mapping[str, Any]] | None = None
    roi_units: str = "ppm"
    outputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _entities(label: str) -> list[tuple[str, str]]:
    pairs = []
    for part in label.split("_"):
        key, sep, value = part.partition("-")
        if sep:
            pairs.append((key, value))
    return pairs


def _png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk; ``None`` if the file is not a PNG."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(_format_value(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items())
    return str(value)


def method_summary(sidecar: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(name, text) lines describing how a Chimap was made, from its JSON sidecar: the known
    fields first, in a fixed order with readable names, then any others under their keys."""
    if not sidecar:
        return []
    lines = []
    known = set()
    for key, name in _SIDECAR_FIELDS:
        known.add(key)
        if key in sidecar:
            lines.append((name, _format_value(sidecar[key])))
    for key, value in sidecar.items():
        if key not in known:
            lines.append((key, _format_value(value)))
    return lines


def _fmt_number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _relative_url(target: str | os.PathLike, start: Path) -> str:
    rel = os.path.relpath(Path(target).resolve(), start.resolve())
    return quote(Path(rel).as_posix())


def _section_html(section: AcquisitionSection, html_dir: Path, out_dir: Path) -> str:
    e = escape
    sid = e(section.label, quote=True)
    out = [f'<section id="{sid}" aria-labelledby="{sid}-h">']
    out.append(f'<h2 id="{sid}-h">{e(section.label)}</h2>')
    ents = _entities(section.label)
    if ents:
        out.append('<dl class="meta">')
        for key, value in ents:
            out.append(f"<dt>{e(_ENTITY_NAMES.get(key, key))}</dt><dd>{e(value)}</dd>")
        out.append("</dl>")
    for note in section.notes:
        out.append(f'<p class="note">{e(note)}</p>')

    out.append("<h3>Method</h3>")
    lines = method_summary(section.sidecar) + list(section.extra_methods.items())
    if lines:
        out.append('<dl class="meta">')
        for name, text in lines:
            out.append(f"<dt>{e(name)}</dt><dd>{e(text)}</dd>")
        out.append("</dl>")
    else:
        out.append("<p>No JSON sidecar was found for the susceptibility map.</p>")

    out.append("<h3>Figures</h3>")
    for fig in section.figures:
        size = _png_size(fig.path)
        dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
        src = e(_relative_url(fig.path, html_dir), quote=True)
        out.append("<figure>")
        out.append(f'<img src="{src}" alt="{e(fig.alt, quote=True)}"{dims}>')
        if fig.caption:
            out.append(f"<figcaption>{e(fig.caption)}</figcaption>")
        out.append("</figure>")

    if section.roi_rows is not None:
        out.append("<h3>Regions of interest</h3>")
        units = e(section.roi_units)
        out.append("<table>")
        out.append(
            f"<caption>Susceptibility per region ({units}, voxels inside the local-field "
            "mask)</caption>"
        )
        out.append(
            '<thead><tr><th scope="col">Label</th><th scope="col">Region</th>'
            f'<th scope="col">Voxels</th><th scope="col">Mean ({units})</th>'
            f'<th scope="col">SD ({units})</th></tr></thead>'
        )
        out.append("<tbody>")
        for row in section.roi_rows:
            out.append(
                f'<tr><td class="num">{e(str(row["label"]))}</td><td>{e(str(row["name"]))}</td>'
                f'<td class="num">{int(row["n_voxels"])}</td>'
                f'<td class="num">{_fmt_number(row["mean"])}</td>'
                f'<td class="num">{_fmt_number(row["sd"])}</td></tr>'
            )
        out.append("</tbody></table>")

    if section.outputs:
        out.append("<h3>Files</h3><ul>")
        for path in section.outputs:
            p = Path(path)
            try:
                shown = p.resolve().relative_to(out_dir.resolve()).as_posix()
            except ValueError:
                shown = str(p)
            out.append(f"<li><code>{e(shown)}</code></li>")
        out.append("</ul>")
    out.append("</section>")
    return "\n".join(out)


def render_report(
    *,
    subject: str,
    sections: Sequence[AcquisitionSection],
    html_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    version: str | None = None,
    generated: str | None = None,
) -> str:
    """The page as a string. Image links are relative to ``html_path``'s folder; file paths
    are shown relative to ``out_dir`` (the derivatives root) when inside it."""
    from .. import __version__

    e = escape
    version = version or __version__
    generated = generated or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    html_dir = Path(html_path).parent
    out_dir = Path(out_dir)
    title = f"qsmflow report: sub-{subject}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="generator" content="qsmflow ' + e(version, quote=True) + '">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{e(title)}</h1>",
        f"<p>Quality-control report of quantitative susceptibility mapping, "
        f"{len(sections)} acquisition{'s' if len(sections) != 1 else ''}.</p>",
        "</header>",
        "<main>",
    ]
    if len(sections) > 1:
        parts.append('<nav aria-label="Acquisitions"><ul>')
        for s in sections:
            parts.append(f'<li><a href="#{e(s.label, quote=True)}">{e(s.label)}</a></li>')
        parts.append("</ul></nav>")
    if not sections:
        parts.append("<p>No acquisitions were processed for this subject.</p>")
    parts.extend(_section_html(s, html_dir, out_dir) for s in sections)
    parts += [
        "</main>",
        "<footer>",
        f"<p>Generated by qsmflow {e(version)} on {e(generated)}.</p>",
        f"<p>Outputs: <code>{e(str(out_dir.resolve()))}</code></p>",
        "</footer>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(
    html_path: str | os.PathLike,
    *,
    subject: str,
    sections: Sequence[AcquisitionSection],
    out_dir: str | os.PathLike,
    version: str | None = None,
) -> Path:
    """Render the page (:func:`render_report`) and write it atomically to ``html_path``."""
    html_path = Path(html_path)
    text = render_report(
        subject=subject, sections=sections, html_path=html_path, out_dir=out_dir, version=version
    )
    with atomic_path(html_path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return html_path
