"""The console's live view: a Textual app that keeps the screen current from a FrameSource
(supervisor API or Redis) and sends commands through it. `console/app.py` adds the keys.

Data path: the `stream` worker reads frames into the ConsoleModel (cheap, never touches
widgets); a timer flushes the model's changes to the screen a few times a second inside
`batch_update()`, updating only the table cells that changed. Pausing stops the flush;
the worker keeps collecting.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable

import structlog
from textual import on, work
from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Input
from textual.worker import Worker, WorkerState

from console.bars import FilterBar, StatusBar, TakeoverBar, status_text
from console.calls_table import CallsTable
from console.client import ConnectionChanged, FrameSource, SupervisorClient
from console.model import ConsoleModel
from console.side_panels import LatencyPanel, SpendPanel
from console.transcript import TranscriptPanel
from console.view_state import CallView, Changes
from engine.bus.events import BusGap
from engine.supervision.api_schema import (
    CommandName,
    ErrorFrame,
    EventFrame,
    Hello,
    Reply,
    Snapshot,
)

log = structlog.get_logger(__name__)

MAX_TOASTS_PER_FLUSH = 4
_SEVERITY = {"info": "information", "information": "information", "warning": "warning",
             "critical": "error"}


class LiveView(App[int]):
    """Live calls, transcripts, latency and spend, kept current from the source."""

    CSS_PATH = "console.tcss"
    TITLE = "Switchboard"
    ENABLE_COMMAND_PALETTE = False

    def __init__(self, source: FrameSource, *, readonly: bool = False,
                 clock: Callable[[], float] = time.time, flush_interval_s: float = 0.25,
                 table_interval_s: float = 0.5,
                 ended_ttl_s: float = 60.0, watch_terminal: bool = True,
                 latency_alert_s: float = 2.0) -> None:
        super().__init__()
        self.source = source
        self.clock = clock
        self.model = ConsoleModel(clock, ended_ttl_s=ended_ttl_s)
        self.readonly = readonly or source.readonly
        self.connection = ConnectionChanged("connecting")
        self.hello: Hello | None = None
        self.paused = False
        self.filter_text = ""
        self.replies: list[tuple[str, str, Reply]] = []  # (command, call_sid, reply)
        self.flush_times: deque[float] = deque(maxlen=20_000)
        self._flush_interval_s = flush_interval_s
        # Each table update re-renders every visible row, so cell changes are applied at
        # most this often (rows appearing/disappearing are applied at once).
        self._table_interval_s = table_interval_s
        self._last_table_apply = float("-inf")
        self._watch_terminal = watch_terminal
        self._latency_alert_s = latency_alert_s
        self._table_dirty = False  # apply the table at the next flush regardless
        self._mounted = False

    # -- layout ----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        yield FilterBar(id="filter")
        yield CallsTable(latency_alert_s=self._latency_alert_s, id="calls")
        with Horizontal(id="lower"):
            yield TranscriptPanel(id="transcript")
            with Vertical(id="side"):
                yield LatencyPanel(id="latency")
                yield SpendPanel(id="spend")
        yield TakeoverBar(id="takeover")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        # Held, not queried later: queries go to the active screen, which may be a modal.
        self._table = self.query_one(CallsTable)
        self._transcript = self.query_one(TranscriptPanel)
        self._latency = self.query_one(LatencyPanel)
        self._spend = self.query_one(SpendPanel)
        self._status = self.query_one(StatusBar)
        self._filter_bar = self.query_one(FilterBar)
        self._takeover_bar = self.query_one(TakeoverBar)
        self._filter_input = self.query_one("#filter-input", Input)
        self._filter_bar.display = False
        self._takeover_bar.display = False
        self._table.focus()
        self._mounted = True
        self.consume_stream()
        self.set_interval(self._flush_interval_s, self.flush)
        if self._watch_terminal and not self.is_headless:
            self.set_interval(2.0, self._check_terminal)
        self.flush_now()

    async def on_unmount(self) -> None:
        self._mounted = False
        await self.source.close()

    # -- live data -------------------------------------------------------------------------

    @work(exclusive=True, group="stream", exit_on_error=False)
    async def consume_stream(self) -> None:
        async for item in self.source.frames():
            if isinstance(item, EventFrame):
                self.model.apply_event(item.event, item.id)
                if isinstance(item.event, BusGap) and isinstance(self.source,
                                                                 SupervisorClient):
                    log.warning("console_resync_after_gap", missed_after=item.event.missed_after)
                    await self.source.resync()
            elif isinstance(item, ConnectionChanged):
                self.connection = item
                if item.state == "failed":
                    self.notify(item.detail, title="Connection failed", severity="error",
                                timeout=10)
            elif isinstance(item, Snapshot):
                self.model.apply_snapshot(item)
            elif isinstance(item, Hello):
                self.hello = item
                if item.fleet != self._table.engines_shown:  # the fleet's calls: by engine
                    self._table.show_engines(item.fleet)
                    self._table_dirty = True
                if item.readonly and not self.readonly:
                    self.readonly = True
                    self.refresh_bindings()
            elif isinstance(item, ErrorFrame):
                self.notify(item.message, title="Engine", severity="warning")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group == "stream" and event.state == WorkerState.ERROR:
            error = event.worker.error
            log.error("console_stream_failed", error=repr(error))
            self.connection = ConnectionChanged("failed", f"stream stopped: {error}")

    def flush_now(self) -> None:
        """Flush including the table: after a key (filter, unpause) show it at once."""
        self._table_dirty = True
        self.flush()

    def flush(self) -> None:
        """Apply the model's changes to the widgets (the only place that redraws)."""
        if not self._mounted or not self._table.is_attached:
            return
        if self.paused:
            self._show_status()
            return
        started = time.perf_counter()
        self.model.tick()
        changes = self.model.take_changes()
        with self.batch_update():
            now = time.monotonic()
            if (changes.order or self._table_dirty
                    or now - self._last_table_apply >= self._table_interval_s):
                self._table_dirty = False
                self._last_table_apply = now
                self._table.show_calls(self.model.sorted_calls(self.filter_text), self.model)
            self._apply_selection(changes)
            self._toast(changes)
            self._show_status()
        self.flush_times.append(time.perf_counter() - started)

    def _apply_selection(self, changes: Changes) -> None:
        sid = self.selected_sid()
        call = self.model.calls.get(sid) if sid else None
        transcript = self._transcript
        if sid != transcript.call_sid or (sid and sid in changes.transcript_touched):
            transcript.show(call, changes.transcripts.get(sid, 0) if sid else 0)
        self._latency.show(call, self.model)
        self._spend.show(call, self.model)

    def _toast(self, changes: Changes) -> None:
        notices = changes.notices
        for notice in notices[:MAX_TOASTS_PER_FLUSH]:
            call = self.model.calls.get(notice.call_sid)
            title = (f"{notice.kind} · {call.from_number or call.call_sid}" if call
                     else notice.kind)
            self.notify(notice.message, title=title,
                        severity=_SEVERITY.get(notice.severity, "warning"))  # type: ignore[arg-type]
        if len(notices) > MAX_TOASTS_PER_FLUSH:
            self.notify(f"and {len(notices) - MAX_TOASTS_PER_FLUSH} more alerts",
                        severity="warning")

    def _show_status(self) -> None:
        self._status.show(status_text(
            self.connection, self.model, paused=self.paused, readonly=self.readonly,
            filter_text=self.filter_text))

    def _check_terminal(self) -> None:
        # A dropped SSH session must not leave the console spinning.
        stdin = sys.__stdin__
        try:
            alive = stdin is not None and os.isatty(stdin.fileno())
        except (OSError, ValueError):
            alive = False
        if not alive:
            log.info("console_terminal_gone")
            self.exit(0)

    # -- selection -------------------------------------------------------------------------

    def selected_sid(self) -> str:
        return self._table.selected_sid()

    def selected_call(self) -> CallView | None:
        sid = self.selected_sid()
        return self.model.calls.get(sid) if sid else None

    @on(DataTable.RowHighlighted, "#calls")
    def _row_highlighted(self) -> None:
        # A highlight can still be queued while the app shuts down (no screen left).
        if not self._mounted or not self.screen_stack:
            return
        self._apply_selection(Changes())
        self.refresh_bindings()

    @on(DataTable.RowSelected, "#calls")
    def _row_selected(self) -> None:
        self._transcript.scroller.focus()

    # -- commands ------------------------------------------------------------------------

    async def send(self, command: CommandName, call_sid: str, *, text: str | None = None,
                   number: str | None = None) -> Reply:
        reply = await self.source.send_command(command, call_sid, text=text, number=number)
        self.replies.append((command, call_sid, reply))
        call = self.model.calls.get(call_sid)
        who = call.from_number or call_sid if call else call_sid
        if reply.ok:
            self.notify(f"{command.replace('_', ' ')} · {who}: ok", title="Done")
        else:
            self.notify(f"{command.replace('_', ' ')} · {who}: {reply.error}",
                        title="Failed", severity="error")
        log.info("console_command", command=command, call_sid=call_sid, ok=reply.ok,
                 error=reply.error)
        return reply
