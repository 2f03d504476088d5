"""The supervisor console: a Textual app over a FrameSource (supervisor API or Redis).

Data path: the `stream` worker reads frames into the ConsoleModel (cheap, never touches
widgets); a timer flushes the model's changes to the screen a few times a second inside
`batch_update()`, updating only the table cells that changed. Pausing stops the flush;
the worker keeps collecting.

Acting keys capture the selected call when pressed, so a re-sort while a dialog is open
never redirects a hang-up to another call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import structlog
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Input
from textual.worker import Worker, WorkerState

from console.client import ConnectionChanged, FrameSource, SupervisorClient
from console.model import CallView, Changes, ConsoleModel
from console.screens import ConfirmScreen, HelpScreen, TransferScreen
from console.widgets import (
    COLUMN_KEYS,
    CallsTable,
    Cell,
    FilterBar,
    LatencyPanel,
    SpendPanel,
    StatusBar,
    TakeoverBar,
    TranscriptPanel,
    cell_text,
    fmt_duration,
    row_cells,
    status_text,
)
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

TOKEN_ENV = "SWITCHBOARD_CONSOLE_TOKEN"
TOKEN_FILE = Path("~/.local/share/switchboard/console_token")
DEFAULT_ENGINE = "ws://127.0.0.1:8081"
ACTING_ACTIONS = frozenset({"take_over", "escalate", "transfer", "hang_up"})
MAX_TOASTS_PER_FLUSH = 4
_SEVERITY = {"info": "information", "information": "information", "warning": "warning",
             "critical": "error"}


class SupervisorConsole(App[int]):
    """Live calls, transcripts, latency and spend; take over, transfer, hang up."""

    CSS_PATH = "console.tcss"
    TITLE = "Switchboard"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("t", "take_over", "Take over"),
        Binding("e", "escalate", "Escalate"),
        Binding("x", "transfer", "Transfer"),
        Binding("h", "hang_up", "Hang up"),
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("p", "pause", "Pause"),
        Binding("q", "quit", "Quit"),
        Binding("escape", "go_back", "Back", show=False),
    ]
    # Described for the help screen (the table's own keys are not app bindings).
    NAVIGATION_HELP: ClassVar[list[tuple[str, str]]] = [
        ("j / k, ↓ / ↑", "move between calls (scroll in the transcript)"),
        ("enter", "focus the selected call's transcript"),
        ("G", "transcript: jump to the newest line"),
        ("esc", "back to the calls / clear the filter / hand back"),
    ]

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
        self._row_order: list[str] = []
        self._row_cache: dict[str, tuple[Cell, ...]] = {}
        self._takeover_sid = ""
        self._table_dirty = False  # apply the table at the next flush regardless
        self._mounted = False

    # -- layout ----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        yield FilterBar(id="filter")
        yield CallsTable(id="calls")
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
                self._apply_rows()
            self._apply_selection(changes)
            self._toast(changes)
            self._show_status()
        self.flush_times.append(time.perf_counter() - started)

    def _apply_rows(self) -> None:
        table = self._table
        calls = self.model.sorted_calls(self.filter_text)
        order = [call.call_sid for call in calls]
        if order != self._row_order:
            selected = self.selected_sid()
            wanted = set(order)
            kept = [sid for sid in self._row_order if sid in wanted]
            if order[:len(kept)] == kept:
                # The usual case (calls ended or started): remove and append, no rebuild.
                for sid in self._row_order:
                    if sid not in wanted:
                        table.remove_row(sid)
                        self._row_cache.pop(sid, None)
                for call in calls[len(kept):]:
                    self._add_row(call)
            else:
                table.clear()
                self._row_cache.clear()
                for call in calls:
                    self._add_row(call)
            self._row_order = order
            # Row positions moved: put the cursor back on the call, not the position.
            if selected in wanted and self.selected_sid() != selected:
                table.move_cursor(row=order.index(selected), animate=False)
        # Update only the cells whose text or style changed (new rows are up to date).
        for call in calls:
            cells = row_cells(call, self.model, self._latency_alert_s)
            cached = self._row_cache.get(call.call_sid)
            if cached == cells:
                continue
            for index, cell in enumerate(cells):
                if cached is None or cached[index] != cell:
                    table.update_cell(call.call_sid, COLUMN_KEYS[index], cell_text(cell))
            self._row_cache[call.call_sid] = cells

    def _add_row(self, call: CallView) -> None:
        cells = row_cells(call, self.model, self._latency_alert_s)
        self._table.add_row(*(cell_text(c) for c in cells), key=call.call_sid)
        self._row_cache[call.call_sid] = cells

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
        table = self._table
        if table.row_count == 0:
            return ""
        row = min(table.cursor_row, table.row_count - 1)
        if row < 0:
            return ""
        key = table.coordinate_to_cell_key(table.cursor_coordinate._replace(row=row)).row_key
        return str(key.value or "")

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

    def call_label(self, call: CallView) -> str:
        who = call.from_number or "unknown caller"
        return f"{who} ({call.call_sid})"

    # -- key actions -----------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ACTING_ACTIONS:
            if self.readonly:
                return False  # hidden from the footer and refused
            if action == "take_over" and self._takeover_sid:
                return True  # t hands back
            call = self.selected_call()
            if call is None or call.ended:
                return None  # shown greyed out: nothing to act on
        return True

    def action_help(self) -> None:
        keys = list(self.NAVIGATION_HELP)
        for binding in self.BINDINGS:
            assert isinstance(binding, Binding)
            if binding.show and self.check_action(binding.action, ()) is not False:
                keys.append((binding.key_display or binding.key, binding.description))
        keys.append(("ctrl+q", "quit (also q)"))
        self.push_screen(HelpScreen(keys))

    def action_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused:
            self.flush_now()
        else:
            self._show_status()

    def action_filter(self) -> None:
        bar = self._filter_bar
        bar.display = True
        self._filter_input.focus()

    @on(Input.Changed, "#filter-input")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self.flush_now()

    @on(Input.Submitted, "#filter-input")
    def _filter_submitted(self) -> None:
        if not self.filter_text:
            self._filter_bar.display = False
        self._table.focus()

    def action_go_back(self) -> None:
        filter_input = self._filter_input
        if self.filter_text or self._filter_bar.display:
            filter_input.value = ""
            self.filter_text = ""
            self._filter_bar.display = False
            self._table.focus()
            self.flush_now()
        elif self._takeover_sid:
            self._hand_back(self._takeover_sid)
        else:
            self._table.focus()

    def action_take_over(self) -> None:
        if self._takeover_sid:
            self._hand_back(self._takeover_sid)
            return
        call = self.selected_call()
        if call is not None and not call.ended:
            self._take_over(call.call_sid, self.call_label(call))

    def action_escalate(self) -> None:
        call = self.selected_call()
        if call is not None:
            self._confirm_and_send(
                "escalate", call.call_sid,
                f"Escalate {self.call_label(call)} to the human queue?",
                self._call_detail(call))

    def action_hang_up(self) -> None:
        call = self.selected_call()
        if call is not None:
            self._confirm_and_send("hang_up", call.call_sid,
                                   f"Hang up {self.call_label(call)}?",
                                   self._call_detail(call))

    def action_transfer(self) -> None:
        call = self.selected_call()
        if call is not None:
            self._transfer(call.call_sid, self.call_label(call), self._call_detail(call))

    def _call_detail(self, call: CallView) -> str:
        return (f"state {call.state}, {fmt_duration(self.model.duration_s(call))} on the "
                f"line, ${call.cost_usd:.3f} so far")

    # -- command flows (workers: dialogs are awaited) --------------------------------------

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

    @work(group="commands")
    async def _confirm_and_send(self, command: CommandName, call_sid: str, question: str,
                                detail: str, number: str | None = None) -> None:
        if await self.push_screen_wait(ConfirmScreen(question, detail)):
            await self.send(command, call_sid, number=number)

    @work(group="commands")
    async def _transfer(self, call_sid: str, label: str, detail: str) -> None:
        destinations = self.hello.transfer_destinations if self.hello else []
        choice = await self.push_screen_wait(TransferScreen(label, destinations))
        if choice is None:
            return
        name, number = choice
        if await self.push_screen_wait(
                ConfirmScreen(f"Transfer {label} to {name} ({number})?", detail)):
            await self.send("transfer", call_sid, number=number)

    @work(group="commands")
    async def _take_over(self, call_sid: str, label: str) -> None:
        reply = await self.send("take_over", call_sid)
        if reply.ok:
            self._takeover_sid = call_sid
            self._takeover_bar.open(call_sid, label)
            self.refresh_bindings()

    @on(TakeoverBar.Say)
    def _say(self, message: TakeoverBar.Say) -> None:
        self.run_worker(self.send("say", message.call_sid, text=message.text),
                        group="commands")

    @on(TakeoverBar.HandBack)
    def _hand_back_requested(self, message: TakeoverBar.HandBack) -> None:
        self._hand_back(message.call_sid)

    def _hand_back(self, call_sid: str) -> None:
        self._takeover_sid = ""
        self._takeover_bar.close()
        self._table.focus()
        self.refresh_bindings()
        self.run_worker(self.send("hand_back", call_sid), group="commands")


# -- command line --------------------------------------------------------------------------


def resolve_token(explicit: str | None, env: dict[str, str] | None = None,
                  token_file: Path = TOKEN_FILE) -> str:
    """--token, else $SWITCHBOARD_CONSOLE_TOKEN, else the token file the engine writes."""
    if explicit:
        return explicit
    environ = os.environ if env is None else env
    if environ.get(TOKEN_ENV):
        return environ[TOKEN_ENV]
    path = token_file.expanduser()
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard console",
                                     description="Supervisor console for live calls")
    parser.add_argument("--engine", default=DEFAULT_ENGINE,
                        help=f"supervisor API address (default {DEFAULT_ENGINE})")
    parser.add_argument("--redis", metavar="URL",
                        help="read events from this Redis instead (read-only)")
    parser.add_argument("--redis-prefix", default="switchboard",
                        help="Redis key prefix (default switchboard)")
    parser.add_argument("--token", help=f"API token (default ${TOKEN_ENV} or {TOKEN_FILE})")
    parser.add_argument("--readonly", action="store_true",
                        help="watch only: acting keys are hidden and refused")
    parser.add_argument("--log-file", default="~/.local/share/switchboard/console.log",
                        help="where the console logs (the terminal belongs to the UI)")
    return parser


def make_source(args: argparse.Namespace) -> FrameSource:
    if args.redis:
        from console.redis_source import RedisEventSource

        return RedisEventSource(args.redis, args.redis_prefix)
    return SupervisorClient(args.engine, resolve_token(args.token), readonly=args.readonly)


def log_to_file(path: str) -> None:
    """Send structlog output to a file: while the UI runs, the terminal is its own."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    stream = target.open("a", encoding="utf-8")
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=stream))


def run_console(argv: Sequence[str] | None = None) -> int:
    """`switchboard console [--engine ws://HOST:PORT] [--redis URL] [--token …]
    [--readonly]`. Returns the process exit code."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        source = make_source(args)
    except ValueError as exc:
        print(f"switchboard console: {exc}", file=sys.stderr)
        return 2
    if isinstance(source, SupervisorClient) and not resolve_token(args.token):
        print(f"switchboard console: no token (use --token, ${TOKEN_ENV} or {TOKEN_FILE})",
              file=sys.stderr)
        return 2
    log_to_file(args.log_file)
    result = SupervisorConsole(source, readonly=args.readonly).run()
    return int(result or 0)


async def run_console_on(engine_url: str, token: str, *, readonly: bool = False) -> int:
    """Open the console on an engine from inside a running event loop (the demo starts an
    engine in-process and then awaits this). Returns when the supervisor quits."""
    client = SupervisorClient(engine_url, token, readonly=readonly)
    result = await SupervisorConsole(client, readonly=readonly).run_async()
    return int(result or 0)
