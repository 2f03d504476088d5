"""The one-line bars: the status bar (connection, lag, counts, alerts, mode), the filter
bar (`/`) and the take-over bar (the supervisor's own lines while speaking on a call).

Colour always comes with a word or symbol (over SSH, colour may be missing or wrong).
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Input, Label, Static

from console.client import ConnectionChanged
from console.formatting import fmt_latency, update_static
from console.model import ConsoleModel


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
    totals = model.totals
    if totals.budget_state != "ok":
        limit = f" ({totals.budget_limit})" if totals.budget_limit else ""
        text.append(f" │ budget {totals.budget_state.upper()}{limit}",
                    style="bold yellow" if totals.budget_state == "warning" else "bold red")
    if totals.budget_totals == "shared":  # the whole fleet's spend (budget.shared)
        text.append(f" │ fleet ${totals.today_usd:.2f} today")
    if totals.budget_totals == "offline":
        text.append(" │ budget totals offline", style="bold yellow")
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
