"""How the widgets write numbers (durations, dollars, latencies), and `update_static`,
which redraws a Static only when its content changed."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


def fmt_duration(seconds: float) -> str:
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def fmt_usd(value: float) -> str:
    if value >= 100:
        return f"${value:,.0f}"
    if value >= 1:
        return f"${value:.2f}"
    return f"${value:.3f}"


def fmt_latency(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def update_static(widget: Static, content: Text | str, *, layout: bool = False) -> None:
    """Update only when the content changed. layout=False for fixed-size widgets: a
    layout pass over the whole screen is the most expensive part of a redraw."""
    previous = getattr(widget, "_console_last", None)
    key = (content.plain, tuple(content.spans), str(content.style)) if isinstance(
        content, Text) else content
    if key != previous:
        widget._console_last = key  # type: ignore[attr-defined]
        widget.update(content, layout=layout)
