"""SVG charts drawn by hand (line charts over steps, bar charts, histograms): no plotting library.

Every label goes through html.escape, so a chart can be inlined into an HTML page as it is.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

WIDTH, HEIGHT = 720, 360
MARGIN = {"left": 64, "right": 16, "top": 32, "bottom": 44}
BOTTOM = HEIGHT - MARGIN["bottom"]  # the plot area's lower edge
MAX_POINTS = 1500  # per line: more is invisible at this width and makes the page heavy
LIGHT, DARK, MARK = "#9ecae1", "#08519c", "#d62728"


def smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _scale(lo: float, hi: float, a: float, b: float):
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _head(title: str, height: int = HEIGHT) -> list[str]:
    """The <svg> element and the chart's title."""
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">',
            f'<rect width="{WIDTH}" height="{height}" fill="white"/>',  # also when shown alone
            f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">'
            f"{html.escape(title)}</text>"]  # fmt: skip


def _text(x: float, y: float, text: str, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{html.escape(text)}</text>'


def _placeholder(title: str, note: str) -> str:
    """A chart with nothing to plot, kept short: its title and why it is empty."""
    width = WIDTH - MARGIN["left"] - MARGIN["right"]
    box = f'<rect x="{MARGIN["left"]}" y="30" width="{width}" height="36" fill="#f6f6f6" stroke="#ccc"/>'
    return "\n".join([*_head(title, 76), box, _text(WIDTH / 2, 52, note), "</svg>\n"])


def _frame(x_label: str, y_label: str, bottom: float = BOTTOM) -> list[str]:
    """The plot area's border and the axis labels."""
    left = MARGIN["left"]
    right, top = WIDTH - MARGIN["right"], MARGIN["top"]
    parts = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
             'fill="white" stroke="#888"/>', _text(WIDTH / 2, HEIGHT - 8, x_label)]  # fmt: skip
    if y_label:
        mid = (top + bottom) / 2
        parts.append(_text(14, mid, y_label, extra=f' transform="rotate(-90 14 {mid:.1f})"'))
    return parts


def _y_axis(ticks: Sequence[float], sy) -> list[str]:
    left, right = MARGIN["left"], WIDTH - MARGIN["right"]
    parts = []
    for t in ticks:
        y = sy(t)
        parts.append(f'<line x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(_text(left - 6, y + 4, f"{t:.4g}", anchor="end"))
    return parts


def _x_axis(ticks: Sequence[float], sx) -> list[str]:
    top, bottom = MARGIN["top"], BOTTOM
    parts = []
    for t in ticks:
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="#eee"/>')
        parts.append(_text(x, bottom + 16, f"{t:g}"))
    return parts


def _polyline(xs, ys, sx, sy, style: str) -> str:
    points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys, strict=True))
    return f'<polyline fill="none" {style} points="{points}"/>'


def _thin(values: Sequence[float], most: int = MAX_POINTS) -> list[float]:
    """Every k-th value (the last kept) so a long run's SVG stays small: k = len / most."""
    k = math.ceil(len(values) / most)
    kept = list(values[::k])
    return kept if (len(values) - 1) % k == 0 else [*kept, values[-1]]


def _ticks_within(lo: float, hi: float, count: int = 5) -> list[float]:
    return [t for t in nice_ticks(lo, hi, count) if lo - 1e-12 <= t <= hi + 1e-12]


def line_chart_svg(
    steps: Sequence[float], values: Sequence[float], title: str, *, y_label: str = "",
    x_label: str = "optimizer step", smoothed: bool = False, empty_note: str = "nothing logged",
) -> str:  # fmt: skip
    """A line chart of values against steps; with `smoothed`, raw light and its EMA dark."""
    if not steps:
        return _placeholder(title, empty_note)
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 0.05
    x_lo = min(steps)
    x_hi = max(steps) if max(steps) > x_lo else x_lo + 1
    sx = _scale(x_lo, x_hi, MARGIN["left"], WIDTH - MARGIN["right"])
    sy = _scale(lo - pad, hi + pad, BOTTOM, MARGIN["top"])
    parts = [*_head(title), *_frame(x_label, y_label)]
    parts += _y_axis(_ticks_within(lo - pad, hi + pad), sy)
    parts += _x_axis(_ticks_within(x_lo, x_hi, 6), sx)
    lines = [(values, LIGHT, 1), (smooth(values), DARK, 2)] if smoothed else [(values, DARK, 2)]
    for ys, colour, width in lines:  # smoothed over every step, then thinned for drawing
        xs, ys = _thin(steps), _thin(ys)
        parts.append(_polyline(xs, ys, sx, sy, f'stroke="{colour}" stroke-width="{width}"'))
    return "\n".join([*parts, "</svg>\n"])


def loss_curve_svg(
    steps: Sequence[int], losses: Sequence[float], title: str = "training loss"
) -> str:
    """An SVG line chart of the loss (light) and its smoothed curve (dark) against the step."""
    return line_chart_svg(
        steps, losses, title, y_label="loss", smoothed=True, empty_note="no loss logged yet"
    )


def _bar(x: float, y: float, w: float, h: float, tip: str) -> str:
    """One bar; its <title> is the browser's tooltip (no script needed)."""
    return (f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{max(w, 0.5):.1f}" '
            f'height="{h:.1f}" fill="{DARK}"><title>{html.escape(tip)}</title></rect>')  # fmt: skip


def _count_axis(counts: Sequence[int], bottom: float = BOTTOM):
    """(scale, tick lines) of a count axis starting at zero."""
    top = max(max(counts, default=0), 1) * 1.1
    sy = _scale(0, top, bottom, MARGIN["top"])
    ticks = [t for t in _ticks_within(0, top) if t == int(t)]
    return sy, _y_axis(ticks, sy)


def bar_chart_svg(
    labels: Sequence[str], counts: Sequence[int], title: str, *, x_label: str,
    y_label: str = "count", empty_note: str = "nothing to count",
) -> str:  # fmt: skip
    """One labelled bar per category, with its count written above it."""
    if not labels:
        return _placeholder(title, empty_note)
    left, right = MARGIN["left"], WIDTH - MARGIN["right"]
    slot = (right - left) / len(labels)
    rotate = slot < 44  # side by side the labels would overlap: slant them, below a lower plot
    bottom = BOTTOM - 28 if rotate else BOTTOM
    sy, axis = _count_axis(counts, bottom)
    parts = [*_head(title), *_frame(x_label, y_label, bottom), *axis]
    for k, (label, count) in enumerate(zip(labels, counts, strict=True)):
        x, y0 = left + k * slot, sy(0)
        parts.append(
            _bar(x + slot * 0.15, sy(count), slot * 0.7, y0 - sy(count), f"{label}: {count}")
        )
        parts.append(_text(x + slot / 2, sy(count) - 3, str(count)))
        cx, ly = x + slot / 2 + (4 if rotate else 0), y0 + 14
        turn = f' transform="rotate(-35 {cx:.1f} {ly:.1f})"' if rotate else ""
        parts.append(_text(cx, ly, label, anchor="end" if rotate else "middle", extra=turn))
    return "\n".join([*parts, "</svg>\n"])


def histogram_svg(
    edges: Sequence[float], counts: Sequence[int], title: str, *, x_label: str,
    y_label: str = "count", marker: tuple[float, str] | None = None,
    empty_note: str = "nothing to count",
) -> str:  # fmt: skip
    """Bars over a numeric axis (bin i spans edges[i]..edges[i+1]); `marker` = (x, label) line."""
    if not counts:
        return _placeholder(title, empty_note)
    x_lo, x_hi = edges[0], edges[-1]
    if marker is not None:
        x_lo, x_hi = min(x_lo, marker[0]), max(x_hi, marker[0] + 1)
    sx = _scale(x_lo, x_hi, MARGIN["left"], WIDTH - MARGIN["right"])
    sy, axis = _count_axis(counts)
    parts = [*_head(title), *_frame(x_label, y_label), *axis]
    parts += _x_axis([t for t in _ticks_within(x_lo, x_hi, 8) if t == int(t)], sx)
    for a, b, count in zip(edges[:-1], edges[1:], counts, strict=True):
        if count:
            tip = f"{math.ceil(a)}-{math.floor(b)}: {count}"
            parts.append(_bar(sx(a) + 0.5, sy(count), sx(b) - sx(a) - 1, sy(0) - sy(count), tip))
    if marker is not None:
        x = sx(marker[0])
        parts.append(f'<line class="marker" x1="{x:.1f}" x2="{x:.1f}" y1="{MARGIN["top"]}" '
                     f'y2="{BOTTOM}" stroke="{MARK}" stroke-width="2" '
                     'stroke-dasharray="6 3"/>')  # fmt: skip
        parts.append(
            _text(x - 4, MARGIN["top"] + 14, marker[1], anchor="end", extra=f' fill="{MARK}"')
        )
    return "\n".join([*parts, "</svg>\n"])
