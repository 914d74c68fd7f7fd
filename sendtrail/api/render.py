"""The automation report as a picture: the flow, top to bottom, with per-node counts.

:func:`render_svg` and :func:`render_png` take the JSON report of
``GET /api/v1/automations/{id}/report`` (``automation``, ``nodes``,
``completion``, ``period``) and draw the same layout:

* a title (automation name) and a subtitle (period, totals);
* one card per node, in step order, joined by arrows: ``#index name`` and
  the kind on the left, four coloured counts on the right (done, waiting,
  filtered, stopped);
* a legend.

SVG: one ``<g class="node" data-step-index=..>`` per node, every text escaped.
PNG: drawn with Pillow at ``scale`` (2 by default, crisp on slides).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Mapping, Sequence
from xml.sax.saxutils import escape

WIDTH = 760
MARGIN = 24
HEADER = 86
NODE_H = 78
GAP = 34
LEGEND_H = 40

STATES = ("done", "waiting", "filtered", "stopped")
LABELS = {"done": "done", "waiting": "waiting", "filtered": "filtered", "stopped": "stopped"}
COLORS = {
    "done": "#2e7d32",
    "waiting": "#ef8f00",
    "filtered": "#6d7b8d",
    "stopped": "#c62828",
}
KIND_LABELS = {
    "email": "E-mail",
    "linkedin_connect": "LinkedIn connect",
    "linkedin_message": "LinkedIn message",
    "task": "Task",
    "wait": "Wait",
    "condition": "Condition",
}
INK = "#1f2933"
MUTED = "#616e7c"
CARD = "#ffffff"
CARD_BORDER = "#cbd2d9"
BACKGROUND = "#f5f7fa"


@dataclass(frozen=True)
class _Node:
    step_index: int
    title: str
    kind: str
    counts: dict[str, int]
    y: int


def _fmt_int(value: Any) -> str:
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return "0"


def _fmt_count(value: Any) -> str:
    """A count that fits its badge: 12,345 up to 99,999, then 412K, 4.1M, 1.2B."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        return "0"
    if n < 100_000:
        return f"{n:,}"
    for div, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "K")):
        if n >= div:
            v = n / div
            return (f"{v:.1f}" if v < 10 else f"{v:.0f}") + suffix
    return str(n)  # pragma: no cover


def _fmt_time(value: Any) -> str:
    text = str(value)
    if "T" in text:
        day, _, clock = text.partition("T")
        clock = clock[:5]
        return day if clock == "00:00" else f"{day} {clock}"
    return text


def _truncate(text: str, limit: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _period_text(report: Mapping[str, Any]) -> str:
    period = report.get("period") or {}
    start, end = period.get("from"), period.get("to")
    if not start and not end:
        return "All time"
    return f"{_fmt_time(start) if start else '…'} – {_fmt_time(end) if end else 'now'} (UTC)"


def _layout(report: Mapping[str, Any]) -> tuple[list[_Node], int]:
    nodes = []
    y = HEADER
    for n in report.get("nodes") or []:
        idx = int(n.get("step_index", 0))
        name = n.get("name") or f"Step {idx}"
        nodes.append(_Node(
            step_index=idx,
            title=_truncate(f"#{idx}  {name}", 30),
            kind=KIND_LABELS.get(n.get("kind") or "", n.get("kind") or ""),
            counts={s: int(n.get(s) or 0) for s in STATES},
            y=y,
        ))
        y += NODE_H + GAP
    height = (y - GAP if nodes else y + 40) + LEGEND_H + MARGIN
    return nodes, height


def _subtitle(report: Mapping[str, Any]) -> str:
    comp = report.get("completion") or {}
    parts = [_period_text(report)]
    if comp:
        parts.append(
            f"completed {_fmt_int(comp.get('completed'))} · in progress {_fmt_int(comp.get('in_progress'))}"
            f" · not started {_fmt_int(comp.get('not_started'))}"
        )
    return "   |   ".join(parts)


_BADGE_W = 92
_BADGES_X = WIDTH - MARGIN - 4 * _BADGE_W - 12


def render_svg(report: Mapping[str, Any]) -> str:
    """The report as a standalone SVG document (UTF-8 text)."""
    automation = report.get("automation") or {}
    nodes, height = _layout(report)
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif">',
        f"<title>{escape(str(automation.get('name') or 'Automation'))}</title>",
        f'<rect width="{WIDTH}" height="{height}" fill="{BACKGROUND}"/>',
        f'<text x="{MARGIN}" y="38" font-size="22" font-weight="bold" fill="{INK}">'
        f"{escape(_truncate(automation.get('name') or 'Automation', 60))}</text>",
        f'<text x="{MARGIN}" y="62" font-size="13" fill="{MUTED}">{escape(_subtitle(report))}</text>',
    ]
    for i, node in enumerate(nodes):
        x, y, w = MARGIN, node.y, WIDTH - 2 * MARGIN
        out.append(f'<g class="node" data-step-index="{node.step_index}">')
        out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{NODE_H}" rx="10" fill="{CARD}" '
                   f'stroke="{CARD_BORDER}" stroke-width="1.5"/>')
        out.append(f'<text class="node-title" x="{x + 16}" y="{y + 32}" font-size="16" font-weight="bold" '
                   f'fill="{INK}">{escape(node.title)}</text>')
        out.append(f'<text class="node-kind" x="{x + 16}" y="{y + 56}" font-size="13" fill="{MUTED}">'
                   f"{escape(node.kind)}</text>")
        for j, state in enumerate(STATES):
            bx = _BADGES_X + j * _BADGE_W
            color = COLORS[state]
            out.append(
                f'<g class="count" data-state="{state}" data-count="{node.counts[state]}">'
                f'<rect x="{bx}" y="{y + 14}" width="{_BADGE_W - 8}" height="{NODE_H - 28}" rx="6" '
                f'fill="{color}" fill-opacity="0.12" stroke="{color}"/>'
                f'<text x="{bx + (_BADGE_W - 8) / 2}" y="{y + 40}" font-size="17" font-weight="bold" '
                f'text-anchor="middle" fill="{color}">{_fmt_count(node.counts[state])}</text>'
                f'<text x="{bx + (_BADGE_W - 8) / 2}" y="{y + 56}" font-size="11" text-anchor="middle" '
                f'fill="{color}">{LABELS[state]}</text></g>'
            )
        out.append("</g>")
        if i + 1 < len(nodes):
            cx = WIDTH // 2
            y1, y2 = y + NODE_H, y + NODE_H + GAP
            out.append(f'<path class="edge" d="M{cx} {y1 + 2} L{cx} {y2 - 8}" stroke="{MUTED}" stroke-width="2"/>')
            out.append(f'<path d="M{cx - 6} {y2 - 10} L{cx + 6} {y2 - 10} L{cx} {y2 - 2} Z" fill="{MUTED}"/>')
    if not nodes:
        out.append(f'<text x="{MARGIN}" y="{HEADER + 24}" font-size="14" fill="{MUTED}">'
                   "This automation has no steps.</text>")
    ly = height - MARGIN - 12
    for j, state in enumerate(STATES):
        lx = MARGIN + j * 120
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" rx="2" fill="{COLORS[state]}"/>')
        out.append(f'<text x="{lx + 18}" y="{ly}" font-size="12" fill="{INK}">{LABELS[state]}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _font(size: int, bold: bool = False):
    from PIL import ImageFont

    candidates = (
        ["DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "Arial Bold.ttf"]
        if bold else
        ["DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "Arial.ttf"]
    )
    for name in candidates:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _hex(color: str, alpha: float | None = None) -> tuple[int, ...]:
    r, g, b = int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)
    if alpha is None:
        return (r, g, b)
    # blend on white
    return tuple(round(255 - (255 - c) * alpha) for c in (r, g, b))


def render_png(report: Mapping[str, Any], *, scale: int = 2) -> bytes:
    """The report as a PNG image (Pillow), ``scale`` times the SVG's size."""
    from PIL import Image, ImageDraw

    automation = report.get("automation") or {}
    nodes, height = _layout(report)
    s = max(1, int(scale))
    img = Image.new("RGB", (WIDTH * s, height * s), _hex(BACKGROUND))
    d = ImageDraw.Draw(img)

    def text(x, y, value, size, color, bold=False, anchor="ls"):
        d.text((x * s, y * s), value, fill=_hex(color), font=_font(size * s, bold), anchor=anchor)

    text(MARGIN, 38, _truncate(automation.get("name") or "Automation", 60), 22, INK, bold=True)
    text(MARGIN, 62, _subtitle(report), 13, MUTED)
    for i, node in enumerate(nodes):
        x, y, w = MARGIN, node.y, WIDTH - 2 * MARGIN
        d.rounded_rectangle([x * s, y * s, (x + w) * s, (y + NODE_H) * s], radius=10 * s,
                            fill=_hex(CARD), outline=_hex(CARD_BORDER), width=max(1, int(1.5 * s)))
        text(x + 16, y + 32, node.title, 16, INK, bold=True)
        text(x + 16, y + 56, node.kind, 13, MUTED)
        for j, state in enumerate(STATES):
            bx = _BADGES_X + j * _BADGE_W
            color = COLORS[state]
            d.rounded_rectangle([bx * s, (y + 14) * s, (bx + _BADGE_W - 8) * s, (y + NODE_H - 14) * s],
                                radius=6 * s, fill=_hex(color, 0.12), outline=_hex(color), width=s)
            cx = bx + (_BADGE_W - 8) / 2
            text(cx, y + 40, _fmt_count(node.counts[state]), 17, color, bold=True, anchor="ms")
            text(cx, y + 56, LABELS[state], 11, color, anchor="ms")
        if i + 1 < len(nodes):
            cx = WIDTH // 2
            y1, y2 = y + NODE_H, y + NODE_H + GAP
            d.line([(cx * s, (y1 + 2) * s), (cx * s, (y2 - 8) * s)], fill=_hex(MUTED), width=2 * s)
            d.polygon([((cx - 6) * s, (y2 - 10) * s), ((cx + 6) * s, (y2 - 10) * s), (cx * s, (y2 - 2) * s)],
                      fill=_hex(MUTED))
    if not nodes:
        text(MARGIN, HEADER + 24, "This automation has no steps.", 14, MUTED)
    ly = height - MARGIN - 12
    for j, state in enumerate(STATES):
        lx = MARGIN + j * 120
        d.rounded_rectangle([lx * s, (ly - 10) * s, (lx + 12) * s, (ly + 2) * s], radius=2 * s,
                            fill=_hex(COLORS[state]))
        text(lx + 18, ly, LABELS[state], 12, INK)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def node_count_summary(nodes: Sequence[Mapping[str, Any]]) -> list[tuple[int, dict[str, int]]]:
    """(step_index, counts) per node: what both pictures show (used by tests)."""
    return [(int(n["step_index"]), {s: int(n.get(s) or 0) for s in STATES}) for n in nodes]


__all__ = ["render_svg", "render_png", "node_count_summary", "STATES"]
