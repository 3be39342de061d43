"""The demo's HTML report: one self-contained file for auditors who would rather look.

Inline CSS, inline SVG and a few lines of inline JavaScript; nothing is fetched
(a Content-Security-Policy of ``default-src 'none'`` makes the browser refuse
any attempt). Every value that came from a report, a log or a file is
HTML-escaped. Sections: the exchange matrix as a heat map, a timeline of
deliveries, vessel sightings on a map of the Yellow Sea and East Sea as the
originator and three partners saw them, the side-by-side reports, and the audit
results.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from broker.demo_view import Outcome, Point, SideBySide, summary_line


def _coords(text: str) -> tuple[tuple[float, float], ...]:
    """Parse ``"lon,lat lon,lat ..."``."""
    return tuple((float(a), float(b)) for a, b in (p.split(",") for p in text.split()))


# The map's window (degrees) and a hand-drawn coastline, (lon, lat) points: only
# enough to place sightings in the Yellow Sea, East China Sea and East Sea.
LON0, LON1, LAT0, LAT1 = 118.0, 138.0, 28.0, 44.0
MAINLAND: Final = _coords(
    "120.5,28 121.5,28.5 122.1,29.9 121.5,30.3 121.9,30.9 121.9,31.7 120.9,32.6 "
    "120.3,34.3 119.3,35.1 120.3,36 121.4,36.8 122.5,37.4 120.7,37.8 119.5,37.2 "
    "118.9,37.5 118,38.6 118,39.2 119.5,39.9 121,40.8 122.3,40.5 121.9,39.7 121.6,38.9 "
    "123,39.6 124.3,39.9 125,39.5 125.4,38.9 124.8,38.2 125.6,37.7 126.6,37.4 126.5,36.8 "
    "126.5,36 126.4,35 126.3,34.4 127.5,34.6 128.5,35 129.3,35.3 129.5,36 129.4,37 "
    "128.9,37.7 128.4,38.4 127.5,39.2 128.3,39.9 129.7,40.8 129.8,41.5 130.7,42.3 "
    "131.8,43.1 133,42.8 134.5,43.5 135.2,44 "
)
ISLANDS: Final = (
    # Kyushu
    _coords("129.8,33.2 130.4,33.9 131,33.9 131.9,33.2 131.4,31.4 130.6,31 130.2,31.4 130.1,32.2 "),
    # Honshu, its western half
    _coords(
        "130.9,34 131.4,34.4 132.6,35.4 133.5,35.5 134.5,35.6 135.4,35.6 136,36 136.7,36.8 "
        "137.3,37.5 137,36.8 138,37.2 138,34.7 136.9,34.3 135.8,33.5 135.1,34.3 133,34.4 "
        "132,33.9 "
    ),
    # Shikoku
    _coords("132.5,33 133.5,33.4 134.7,33.8 134.6,34.2 133.5,34.3 132.2,33.9 "),
    # Jeju
    _coords("126.2,33.3 126.6,33.55 126.9,33.4 126.6,33.2 "),
)
KIND_COLOURS: Final = {"vessel": "#1f77b4", "worker": "#2ca02c", "transfer": "#d62728"}

_CSS: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}
.ok{color:#11772d;font-weight:bold}.fail{color:#b00020;font-weight:bold}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f4f4f4}td.field,th.field{text-align:left;font-family:monospace}
.heat td{min-width:44px;text-align:center}.heat td.self{background:#eee}
.sbs td{text-align:left;font-family:monospace;font-size:12px;max-width:260px;word-break:break-all}
.sbs td.withheld{background:#eee;color:#888}.sbs td.transformed{background:#fff3cd}
.tag{font-size:11px;color:#8a6d00}.maps{display:flex;flex-wrap:wrap;gap:12px}
.maps figure{margin:0}.maps figcaption{text-align:center;font-weight:bold}
svg text{font:10px sans-serif;fill:#555}#cellinfo{min-height:1.4em;color:#555}
"""

_JS: Final = """
(function () {
  var info = document.getElementById('cellinfo');
  document.querySelectorAll('.heat td[data-n]').forEach(function (td) {
    td.addEventListener('mouseenter', function () {
      info.textContent = td.dataset.s + ' \\u2192 ' + td.dataset.r + ': ' + td.dataset.n +
        ' of ' + td.dataset.w + ' released reports stored';
    });
  });
  document.documentElement.setAttribute('data-rendered', 'yes');
})();
"""


def esc(value: object) -> str:
    """HTML-escape any value (quotes included, so it is safe in attributes too)."""
    return html.escape(str(value), quote=True)


def heat_map(outcome: Outcome) -> str:
    """The exchange matrix as a table whose cells are shaded by count."""
    members = outcome.members
    peak = max((outcome.count(s, r) for s in members for r in members), default=0) or 1
    rows = ["<tr><th>from \\ to</th>" + "".join(f"<th>{esc(r)}</th>" for r in members) + "</tr>"]
    for s in members:
        cells = [f"<th>{esc(s)}</th>"]
        for r in members:
            if s == r:
                cells.append('<td class="self">-</td>')
                continue
            n = outcome.count(s, r)
            want = len(outcome.expected.get((s, r), set()))
            alpha = 0.08 + 0.85 * n / peak if n else 0.0
            colour = "#fdd" if n != want else f"rgba(31,119,180,{alpha:.2f})"
            cells.append(
                f'<td style="background:{colour}" data-s="{esc(s)}" data-r="{esc(r)}" '
                f'data-n="{n}" data-w="{want}" title="{esc(s)} to {esc(r)}: {n}/{want}">{n}</td>'
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<table class="heat" id="heatmap">' + "".join(rows) + "</table>"
        '<p id="cellinfo">Rows send, columns receive; hover a cell. Red: not all arrived.</p>'
    )


def timeline(events: Sequence[tuple[float, str, str, str]], width: int = 900) -> str:
    """Deliveries over time (about 40 bars), stacked by kind, as an SVG bar chart."""
    height, pad = 220, 36
    if not events:
        return '<svg id="timeline" width="10" height="10" role="img"></svg>'
    last = max(e[0] for e in events)
    # About 40 bars whatever the run's length, never finer than 0.1 s.
    step = max(0.1, round(last / 40, 1))
    span = last + step
    buckets: Counter[tuple[int, str]] = Counter((int(t / step), k) for t, _, _, k in events)
    n_buckets = int(span / step) + 1
    per = Counter[int]()
    for (b, _), n in buckets.items():
        per[b] += n
    peak = max(per.values())
    bar = (width - 2 * pad) / n_buckets
    parts = [
        f'<svg id="timeline" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'role="img" aria-label="deliveries over time">',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#999"/>',
        f'<text x="{pad}" y="{height - 8}">0 s</text>',
        f'<text x="{width - pad - 30}" y="{height - 8}">{span:.1f} s</text>',
        f'<text x="4" y="{pad - 10}">{peak} per {step:g} s</text>',
    ]
    for b in range(n_buckets):
        y = float(height - pad)
        for kind, colour in KIND_COLOURS.items():
            n = buckets.get((b, kind), 0)
            if not n:
                continue
            h = (height - 2 * pad) * n / peak
            y -= h
            parts.append(
                f'<rect x="{pad + b * bar:.1f}" y="{y:.1f}" width="{max(bar - 1, 1):.1f}" '
                f'height="{h:.1f}" fill="{colour}"><title>{esc(kind)}: {n} at '
                f"{b * step:.1f} s</title></rect>"
            )
    for i, (kind, colour) in enumerate(KIND_COLOURS.items()):
        x = width - pad - 240 + 80 * i
        parts.append(f'<rect x="{x}" y="8" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{x + 14}" y="17">{esc(kind)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _xy(lon: float, lat: float, size: int) -> tuple[float, float]:
    return (lon - LON0) / (LON1 - LON0) * size, (LAT1 - lat) / (LAT1 - LAT0) * size


def _path(points: Iterable[tuple[float, float]], size: int, close: bool) -> str:
    coords = " L".join("{:.1f},{:.1f}".format(*_xy(lon, lat, size)) for lon, lat in points)
    return f"M{coords}{' Z' if close else ''}"


def sea_map(title: str, points: Sequence[Point], size: int = 270) -> str:
    """One small SVG map: graticule, coastline, and ``points`` (coarsened cells outlined)."""
    parts = [
        f'<figure><svg class="map" width="{size}" height="{size}" viewBox="0 0 {size} {size}" '
        f'role="img" aria-label="{esc(title)}">'
        f'<rect width="{size}" height="{size}" fill="#eaf3fb"/>'
    ]
    for lon in range(int(LON0), int(LON1) + 1, 2):
        x, _ = _xy(lon, LAT0, size)
        parts.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{size}" stroke="#c9d9e8"/>')
        if lon % 4 == 2:
            parts.append(f'<text x="{x + 2:.1f}" y="{size - 3}">{lon}E</text>')
    for lat in range(int(LAT0), int(LAT1) + 1, 2):
        _, y = _xy(LON0, lat, size)
        parts.append(f'<line x1="0" y1="{y:.1f}" x2="{size}" y2="{y:.1f}" stroke="#c9d9e8"/>')
        if lat % 4 == 0 and lat > LAT0:
            parts.append(f'<text x="2" y="{y - 2:.1f}">{lat}N</text>')
    parts.append(
        f'<path d="{_path(MAINLAND, size, False)}" fill="none" stroke="#6b5" stroke-width="1.5"/>'
    )
    for island in ISLANDS:
        parts.append(f'<path d="{_path(island, size, True)}" fill="#dfeccf" stroke="#6b5"/>')
    for p in points:
        x, y = _xy(p.lon, p.lat, size)
        if p.note.startswith("coarsen:"):
            step = float(p.note.partition(":")[2])
            half = step / (LON1 - LON0) * size / 2
            parts.append(
                f'<rect x="{x - half:.1f}" y="{y - half:.1f}" width="{2 * half:.1f}" '
                f'height="{2 * half:.1f}" fill="rgba(214,39,40,0.08)" '
                'stroke="rgba(214,39,40,0.4)"/>'
            )
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#d62728">'
            f"<title>{esc(p.label)} {p.lat:.4f}, {p.lon:.4f} ({esc(p.note)})</title></circle>"
        )
    parts.append(f"</svg><figcaption>{esc(title)} ({len(points)})</figcaption></figure>")
    return "".join(parts)


def side_by_side_table(view: SideBySide) -> str:
    """One report as the originator wrote it and as each viewer received it."""
    head = "".join(f"<th>as {esc(v)} received it</th>" for v in view.viewers)
    rows = [
        f'<tr><th class="field">field</th><th>{esc(view.originator)} (original)</th>{head}</tr>'
    ]
    for path, original, cells in view.rows:
        tds = [f'<td class="field">{esc(path)}</td>', f"<td>{esc(original)}</td>"]
        for c in cells:
            if c.note == "withheld":
                tds.append(f'<td class="withheld">{esc(c.value)}</td>')
            elif c.note:
                tds.append(
                    f'<td class="transformed">{esc(c.value)} <span class="tag">'
                    f"{esc(c.note)}</span></td>"
                )
            else:
                tds.append(f"<td>{esc(c.value)}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return (
        f"<h3>{esc(view.originator)}'s {esc(view.kind)} report <code>{esc(view.report_id)}</code>"
        f'</h3><table class="sbs">{"".join(rows)}</table>'
    )


def audit_section(outcome: Outcome) -> str:
    """Each node's ``msmt audit verify`` result and the replay's findings."""
    rows = [
        "<tr><th>node</th><th>verify</th><th>entries</th><th>cosigners</th><th>detail</th></tr>"
    ]
    for a in outcome.audits:
        status = '<span class="ok">OK</span>' if a.ok else '<span class="fail">FAIL</span>'
        rows.append(
            f'<tr data-member="{esc(a.member)}" data-ok="{"yes" if a.ok else "no"}">'
            f"<th>{esc(a.member)}</th><td>{status}</td><td>{a.size}</td>"
            f'<td>{len(a.cosigners)}</td><td class="field">{esc(a.detail)}</td></tr>'
        )
    replay = "\n".join(outcome.replay_lines)
    verdict = (
        '<span class="ok">reconciled</span>'
        if outcome.replay_ok
        else '<span class="fail">does not reconcile</span>'
    )
    return (
        f'<table id="audit-table">{"".join(rows)}</table>'
        f"<h3>msmt audit replay across all nodes: {verdict}</h3><pre>{esc(replay)}</pre>"
    )


def render(outcome: Outcome) -> str:
    """The whole report as one HTML document."""
    verdict = "fail" if outcome.failures else "ok"
    failures = "".join(f"<li>{esc(f)}</li>" for f in outcome.failures)
    maps = "".join(sea_map(title, points) for title, points in outcome.vessels.items())
    views = "".join(side_by_side_table(v) for v in outcome.side_by_side)
    csp = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>MSMT demo report</title><style>{_CSS}</style></head>
<body>
<h1>MSMT demo report</h1>
<p id="summary" class="{verdict}">{esc(summary_line(outcome))}</p>
<ul id="failures">{failures}</ul>
<section id="matrix"><h2>Reports exchanged</h2>{heat_map(outcome)}</section>
<section id="timeline-section"><h2>Timeline of deliveries</h2>{timeline(outcome.timeline)}</section>
<section id="map"><h2>Vessel sightings as partners saw them</h2>
<p>Each dot is one vessel report; a shaded square is the grid cell a coarsened position
stands for. Partners the policy gives no position to see nothing.</p>
<div class="maps">{maps}</div></section>
<section id="side-by-side"><h2>One report, as three partners received it</h2>{views}</section>
<section id="audit"><h2>Audit verification</h2>{audit_section(outcome)}</section>
<script>{_JS}</script>
</body></html>
"""


def write_report(outcome: Outcome, path: Path) -> None:
    """Write the report to ``path`` (UTF-8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(outcome), encoding="utf-8")
