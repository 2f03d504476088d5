"""The side column: latency sparklines (the selected call's turns, the p95 of all calls)
and spend meters (the call against its cap, today and the month against their budgets).

Colour always comes with a word or symbol (over SSH, colour may be missing or wrong).
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline, Static

from console.formatting import fmt_latency, fmt_usd, update_static
from console.model import ConsoleModel
from console.view_state import CallView


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
        call_text = Text("Call  -", style="dim")
        if call is not None:
            call_text = meter_text("Call", call.cost_usd, call.cost_cap_usd)
            if call.unpriced:
                call_text.append("\n+ unpriced items (counted as $0)", style="bold yellow")
        update_static(self.call_meter, call_text)
        update_static(self.day_meter,
                      meter_text("Today", totals.today_usd, totals.daily_budget_usd))
        update_static(self.month_meter,
                      meter_text("Month", totals.monthly_projection_usd,
                                 totals.monthly_budget_usd, value_prefix="~"))
