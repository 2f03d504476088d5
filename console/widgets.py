"""Widgets of the console's main screen: calls table, transcript, latency sparklines,
spend meters, status bar, filter and take-over bars.

Colour always comes with a word or symbol (over SSH, colour may be missing or wrong).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Input, Label, Sparkline, Static

from console.client import ConnectionChanged
from console.model import ALERT_MARKERS, CallView, ConsoleModel, LineView

# -- formatting ----------------------------------------------------------------------------


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


# -- calls table ---------------------------------------------------------------------------

# (key, label, width): fixed widths, so updating a cell never re-measures the table.
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("caller", "Caller", 15),
    ("dur", "Dur", 7),
    ("state", "State", 9),
    ("who", "Who", 5),
    ("v2v", "V2V", 6),
    ("cost", "Cost", 7),
    ("alerts", "Alerts", 8),
)
COLUMN_KEYS = tuple(key for key, _label, _width in COLUMNS)

_STATE_STYLE = {"connected": "cyan", "ai": "green", "human_takeover": "bold magenta",
                "transferring": "yellow", "ended": "dim"}
_STATE_WORD = {"connected": "connect", "ai": "ai", "human_takeover": "takeover",
               "transferring": "transfer", "ended": "ended"}

Cell = tuple[str, str]  # (text, style)


def row_cells(call: CallView, model: ConsoleModel, latency_alert_s: float = 2.0
              ) -> tuple[Cell, ...]:
    """One table row as (text, style) pairs; compared across flushes to find changes."""
    dim = "dim" if call.ended else ""
    caller = call.from_number or call.call_sid[-12:]
    who = "-" if call.ended else ("HUMAN" if call.state == "human_takeover" else
                                  "XFER" if call.state == "transferring" else "AI")
    latency = call.last_latency_s
    latency_style = dim or ("bold red" if latency is not None and latency >= latency_alert_s
                            else "")
    cap = call.cost_cap_usd
    cost_style = dim or ("bold red" if cap and call.cost_usd >= cap else
                         "yellow" if cap and call.cost_usd >= 0.8 * cap else "")
    markers = " ".join(dict.fromkeys(ALERT_MARKERS.get(kind, "!?") for kind in call.alerts))
    alert_style = dim or ("bold red" if markers else "")
    return (
        (caller, dim),
        (fmt_duration(model.duration_s(call)), dim),
        (_STATE_WORD.get(call.state, call.state), dim or _STATE_STYLE.get(call.state, "")),
        (who, dim or ("bold magenta" if who == "HUMAN" else "")),
        (fmt_latency(latency), latency_style),
        (fmt_usd(call.cost_usd), cost_style),
        (markers, alert_style),
    )


def cell_text(cell: Cell) -> Text:
    return Text(cell[0], style=cell[1], no_wrap=True, overflow="ellipsis")


class CallsTable(DataTable[Text]):
    """One row per call keyed by call_sid, vim keys added."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, id=id)
        for key, label, width in COLUMNS:
            self.add_column(label, key=key, width=width)


# -- transcript ----------------------------------------------------------------------------

_SPEAKER = {"caller": ("CALLER", "bold cyan"), "agent": ("AGENT ", "bold green"),
            "supervisor": ("SUPERV", "bold magenta"), "system": ("SYSTEM", "dim")}


def render_line(line: LineView) -> Text:
    label, style = _SPEAKER.get(line.speaker, (line.speaker[:6].upper(), ""))
    text = Text(no_wrap=False)
    text.append(label, style=style)
    text.append("~ " if not line.final else "  ", style=style)
    if not line.final:
        text.append(line.text, style="italic dim")
        text.append(" …", style="dim")
    elif line.interrupted:
        heard = line.heard_text
        if heard and line.text.startswith(heard):
            text.append(heard)
            text.append(line.text[len(heard):], style="dim strike")
        else:
            text.append(line.text, style="dim")
        text.append(" [cut]", style="bold yellow")
    else:
        text.append(line.text, style=style if line.speaker == "supervisor" else "")
    if line.low_confidence:
        text.append(" (?)", style="yellow")
    return text


def render_transcript(lines: Sequence[LineView]) -> Text:
    return Text("\n").join(render_line(line) for line in lines)


class TranscriptPanel(Vertical):
    """The selected call's transcript with tail mode: new lines scroll into view only
    while the reader is at the bottom; otherwise an "N new lines" indicator counts them."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("j", "scroll_down", "Down", show=False),
        Binding("k", "scroll_up", "Up", show=False),
        Binding("G", "tail", "Tail", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.call_sid: str | None = None
        self.pending_lines = 0
        # Children are held, never queried: updates may arrive before they are mounted
        # or after they are gone (shutdown), and must be harmless then.
        self.title_label = Label("Transcript", id="transcript-title")
        self.scroller = VerticalScroll(id="transcript-scroll")
        self.body = Static("", id="transcript-body")
        self.pending_label = Label("", id="transcript-pending")

    def compose(self) -> ComposeResult:
        yield self.title_label
        with self.scroller:
            yield self.body
        yield self.pending_label

    def on_mount(self) -> None:
        self.watch(self.scroller, "scroll_y", self._scrolled, init=False)

    def show(self, call: CallView | None, appended: int = 0) -> None:
        """Render `call`; a different call than before starts in tail mode."""
        scroller = self.scroller
        switched = call is None or call.call_sid != self.call_sid
        at_end = switched or scroller.is_vertical_scroll_end or scroller.max_scroll_y == 0
        self.call_sid = call.call_sid if call else None
        title = "Transcript" if call is None else (
            f"Transcript · {call.from_number or call.call_sid}"
            f"{' (ended)' if call.ended else ''}")
        update_static(self.title_label, title)
        body = render_transcript(call.transcript) if call else Text("No call selected",
                                                                    style="dim")
        self.body.update(body)
        if at_end:
            self.pending_lines = 0
            if scroller.is_mounted:
                scroller.scroll_end(animate=False, immediate=False)
        else:
            self.pending_lines += appended
        self._show_pending()

    def _scrolled(self, _value: float) -> None:
        if self.pending_lines and self.scroller.is_vertical_scroll_end:
            self.pending_lines = 0
            self._show_pending()

    def _show_pending(self) -> None:
        self.pending_label.update(
            Text(f"▼ {self.pending_lines} new line{'s' if self.pending_lines != 1 else ''}"
                 " (G: jump to end)", style="bold yellow") if self.pending_lines else "")
        self.pending_label.display = bool(self.pending_lines)

    def action_scroll_down(self) -> None:
        self.scroller.scroll_down(animate=False)

    def action_scroll_up(self) -> None:
        self.scroller.scroll_up(animate=False)

    def action_tail(self) -> None:
        self.scroller.scroll_end(animate=False)
        self.pending_lines = 0
        self._show_pending()


# -- latency and spend ---------------------------------------------------------------------


class LatencyPanel(Vertical):
    """Sparklines: the selected call's turns and the overall p95 over time."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.call_label = Label("Turn V2V", id="call-latency-label")
        self.call_line = Sparkline([], summary_function=max, id="call-latency")
        self.p95_label = Label("p95 all calls", id="p95-label")
        self.p95_line = Sparkline([], summary_function=max, id="p95-latency")

    def compose(self) -> ComposeResult:
        yield self.call_label
        yield self.call_line
        yield self.p95_label
        yield self.p95_line

    def show(self, call: CallView | None, model: ConsoleModel) -> None:
        turns = list(call.latencies) if call else []
        # A new list, not an in-place change: Sparkline repaints on assignment only.
        if self.call_line.data != turns:
            self.call_line.data = turns
        last = fmt_latency(turns[-1]) if turns else "-"
        update_static(self.call_label, f"Turn V2V  last {last}")
        history = list(model.p95_history)
        if self.p95_line.data != history:
            self.p95_line.data = history
        update_static(self.p95_label,
                      f"p95 all calls  {fmt_latency(model.totals.p95_voice_to_voice_s)}")


def meter_text(label: str, value: float, limit: float, width: int = 20,
               value_prefix: str = "") -> Text:
    """Two lines: "<label> $v / $limit", then a bar with a percentage and a word."""
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(f"{label:<6}", style="bold")
    text.append(f"{value_prefix}{fmt_usd(value)}")
    if limit <= 0:
        text.append(" (no limit set)", style="dim")
        return text
    text.append(f" / {fmt_usd(limit)}")
    ratio = value / limit
    style, word = (("green", "") if ratio < 0.8 else ("yellow", " HIGH") if ratio < 1.0
                   else ("bold red", " OVER"))
    filled = min(width, round(ratio * width))
    text.append("\n")
    text.append("█" * filled, style=style)
    text.append("░" * (width - filled), style="dim")
    text.append(f" {ratio * 100:3.0f}%{word}", style=style)
    return text


class SpendPanel(Vertical):
    """Call cost vs its cap, today vs the daily budget, month projection vs budget."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.call_meter = Static("", id="meter-call", classes="meter")
        self.day_meter = Static("", id="meter-day", classes="meter")
        self.month_meter = Static("", id="meter-month", classes="meter")

    def compose(self) -> ComposeResult:
        yield self.call_meter
        yield self.day_meter
        yield self.month_meter

    def show(self, call: CallView | None, model: ConsoleModel) -> None:
        totals = model.totals
        update_static(self.call_meter,
                      meter_text("Call", call.cost_usd, call.cost_cap_usd) if call
                      else Text("Call  -", style="dim"))
        update_static(self.day_meter,
                      meter_text("Today", totals.today_usd, totals.daily_budget_usd))
        update_static(self.month_meter,
                      meter_text("Month", totals.monthly_projection_usd,
                                 totals.monthly_budget_usd, value_prefix="~"))


# -- status, filter, take over -------------------------------------------------------------


def status_text(connection: ConnectionChanged, model: ConsoleModel, *, paused: bool,
                readonly: bool, filter_text: str) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    if connection.state == "connected":
        text.append("● connected", style="bold green")
        if connection.detail:
            text.append(f" {connection.detail}", style="dim")
    elif connection.state == "failed":
        text.append(f"✖ {connection.detail or 'failed'}", style="bold red")
    elif connection.state == "closed":
        text.append("✖ closed", style="bold red")
    else:
        retry = (f" (retry {connection.retry_in_s:.0f}s)"
                 if connection.retry_in_s is not None else "")
        text.append(f"◌ {connection.state}{retry}", style="bold yellow")
    lag = model.last_lag_s
    text.append(f" │ lag {fmt_latency(lag)}",
                style="bold red" if lag is not None and lag > 2.0 else "")
    ended = len(model.calls) - model.live_count
    text.append(f" │ calls {model.live_count}")
    if ended:
        text.append(f" (+{ended} ended)", style="dim")
    alerts = model.alert_count
    text.append(f" │ alerts {alerts}", style="bold red" if alerts else "")
    if model.unhealthy_providers:
        text.append(f" │ down: {', '.join(sorted(model.unhealthy_providers))}",
                    style="bold red")
    if paused:
        text.append(" │ PAUSED", style="bold reverse yellow")
    if filter_text:
        text.append(f" │ filter: {filter_text}", style="bold cyan")
    if readonly:
        text.append(" │ READ-ONLY", style="bold")
    return text


class StatusBar(Static):
    """Connection state, lag, counts, alerts, mode."""

    def show(self, text: Text) -> None:
        update_static(self, text)


class FilterBar(Horizontal):
    """`/` opens it; typing filters the calls table live; Enter keeps, Esc clears."""

    def compose(self) -> ComposeResult:
        yield Label("Filter /", id="filter-label")
        yield Input(placeholder="caller, call id, state or alert", id="filter-input")


class TakeoverBar(Horizontal):
    """Shown while the supervisor speaks on a call: each Enter sends one `say` line."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "hand_back", "Hand back"),
    ]

    class Say(Message):
        def __init__(self, call_sid: str, text: str) -> None:
            super().__init__()
            self.call_sid = call_sid
            self.text = text

    class HandBack(Message):
        def __init__(self, call_sid: str) -> None:
            super().__init__()
            self.call_sid = call_sid

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.call_sid = ""

    def compose(self) -> ComposeResult:
        yield Label("", id="takeover-label")
        yield Input(placeholder="type a line, Enter speaks it; Esc hands back",
                    id="takeover-input")

    def open(self, call_sid: str, who: str) -> None:
        self.call_sid = call_sid
        self.query_one("#takeover-label", Label).update(
            Text(f"SPEAKING on {who} ▸ ", style="bold magenta"))
        self.display = True
        self.query_one("#takeover-input", Input).focus()

    def close(self) -> None:
        self.call_sid = ""
        self.query_one("#takeover-input", Input).value = ""
        self.display = False

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        event.input.value = ""
        if text and self.call_sid:
            self.post_message(self.Say(self.call_sid, text))

    def action_hand_back(self) -> None:
        if self.call_sid:
            self.post_message(self.HandBack(self.call_sid))
