"""Small line charts as hand-written SVG (no plotting library): one panel per series, one polyline per line.

    svg = panels([Panel("RSS", "MB", [Line("worker 0", [(t, v), ...]), ...], mark_x=300.0), ...], columns=2)

Each panel has its own y range (from 0 when the values are all positive and not far from it), the x axis in
minutes, and an optional dashed vertical mark (the soak marks where its second half starts).
"""
from __future__ import annotations

from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
W, H = 460, 220                 # one panel
LEFT, RIGHT, TOP, BOTTOM = 58, 12, 26, 34


class Line:
    def __init__(self, label: str, points: list[tuple[float, float]]):
        self.label, self.points = label, points


class Panel:
    def __init__(self, title: str, unit: str, lines: list[Line], mark_x: float | None = None):
        self.title, self.unit, self.lines, self.mark_x = title, unit, lines, mark_x


def _nice(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 or v == int(v) else f"{v:,.2f}".rstrip("0").rstrip(".")


def _panel(p: Panel, ox: float, oy: float) -> list[str]:
    pts = [pt for line in p.lines for pt in line.points]
    out = [f'<g transform="translate({ox},{oy})">',
           f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{escape(p.title)} '
           f'<tspan font-weight="normal" fill="#555">({escape(p.unit)})</tspan></text>']
    if not pts:
        return out + ['<text x="60" y="100" fill="#999">no data</text>', "</g>"]
    x0, x1 = min(x for x, _ in pts), max(x for x, _ in pts)
    y0, y1 = min(y for _, y in pts), max(y for _, y in pts)
    if y0 >= 0 and y0 <= (y1 - y0) * 2:        # near zero: start the axis at 0, so small wiggles look small
        y0 = 0.0
    span = max(abs(y1) * 0.05, 1.0 if y1 == y0 else 0.0)
    if y1 - y0 < span:                         # at least 5% of the value: a flat series looks flat
        mid = (y0 + y1) / 2
        low = mid - span / 2
        if y0 >= 0 > low:                      # no negative axis for counts
            low = 0.0
        y0, y1 = low, low + span
    if x1 == x0:
        x1 = x0 + 1.0
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def sx(x):
        return LEFT + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return TOP + ph - (y - y0) / (y1 - y0) * ph

    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>')
    for frac in (0.0, 0.5, 1.0):              # y labels and light grid lines
        y = y0 + (y1 - y0) * frac
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 4}" y="{sy(y) + 4:.1f}" font-size="11" text-anchor="end">{_nice(y)}</text>')
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):  # x labels in minutes
        x = x0 + (x1 - x0) * frac
        out.append(f'<text x="{sx(x):.1f}" y="{TOP + ph + 14}" font-size="11" text-anchor="middle">'
                   f'{round(x / 60, 1):g}</text>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 4}" font-size="11" text-anchor="middle" fill="#555">'
               "minutes</text>")
    if p.mark_x is not None and x0 <= p.mark_x <= x1:
        out.append(f'<line x1="{sx(p.mark_x):.1f}" x2="{sx(p.mark_x):.1f}" y1="{TOP}" y2="{TOP + ph}" '
                   'stroke="#999" stroke-dasharray="4 3"/>')
    for i, line in enumerate(p.lines):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line.points)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.3" points="{coords}"/>')
        out.append(f'<text x="{LEFT + pw - 4}" y="{TOP + 14 + 13 * i}" font-size="11" text-anchor="end" '
                   f'fill="{color}">{escape(line.label)}</text>')
    out.append("</g>")
    return out


def panels(items: list[Panel], columns: int = 2, title: str = "") -> str:
    """An SVG document with the panels in a grid, `columns` wide, under an optional title."""
    rows = -(-len(items) // columns) if items else 1
    head = 30 if title else 0
    width, height = W * columns, H * rows + head
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        out.append(f'<text x="10" y="20" font-size="15" font-weight="bold">{escape(title)}</text>')
    for i, p in enumerate(items):
        out += _panel(p, (i % columns) * W, head + (i // columns) * H)
    out.append("</svg>")
    return "\n".join(out) + "\n"
