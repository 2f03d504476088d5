"""The calls table: one row per call, keyed by call_sid, fixed column widths, vim keys.

A flush hands it the calls in display order; it appends and removes rows when calls come
and go (a rebuild only when the order really changed), keeps the cursor on the same call,
and rewrites only the cells whose text or style changed: every `update_cell` re-renders the
visible table, so unchanged cells must not cost anything.

Colour always comes with a word or symbol (over SSH, colour may be missing or wrong).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import DataTable

from console.formatting import fmt_duration, fmt_latency, fmt_usd
from console.model import ConsoleModel
from console.view_state import CallView
from engine.bus.events import CallState

# Alert kinds that stay on a call as a marker until it ends.
ALERT_MARKERS: dict[str, str] = {
    "handoff_requested": "!H",
    "call_cost_cap": "!$",
    "latency_p95": "!L",
    "low_confidence": "!C",
    "provider_failover": "!P",
    "provider_down": "!P",
    "call_cost_warning": "~$",
    "daily_budget": "!B",
    "monthly_budget": "!B",
}

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
# A fleet console (Hello.fleet) adds the engine that owns each call, last.
ENGINE_COLUMN: tuple[str, str, int] = ("engine", "Engine", 8)
# Once a call is in an A/B experiment, its variant ("experiment/variant": the variant).
VARIANT_COLUMN: tuple[str, str, int] = ("variant", "Variant", 9)

_STATE_STYLE = {CallState.CONNECTED: "cyan", CallState.AI: "green",
                CallState.HUMAN_TAKEOVER: "bold magenta", CallState.TRANSFERRING: "yellow",
                CallState.ENDED: "dim"}
_STATE_WORD = {CallState.CONNECTED: "connect", CallState.AI: "ai",
               CallState.HUMAN_TAKEOVER: "takeover", CallState.TRANSFERRING: "transfer",
               CallState.ENDED: "ended"}

Cell = tuple[str, str]  # (text, style)


def row_cells(call: CallView, model: ConsoleModel, latency_alert_s: float = 2.0
              ) -> tuple[Cell, ...]:
    """One table row as (text, style) pairs; compared across flushes to find changes."""
    dim = "dim" if call.ended else ""
    caller = call.from_number or call.call_sid[-12:]
    who = "-" if call.ended else ("HUMAN" if call.state == CallState.HUMAN_TAKEOVER else
                                  "XFER" if call.state == CallState.TRANSFERRING else "AI")
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
        # "?": part of the cost has no price (counted as $0), so the figure is low.
        (fmt_usd(call.cost_usd) + ("?" if call.unpriced else ""),
         cost_style or ("yellow" if call.unpriced else "")),
        (markers, alert_style),
    )


def engine_label(engine_id: str) -> str:
    """An engine id as the table shows it: `new_engine_id`'s random suffix (unique per
    process start, the end of the id in logs and /healthz), else the id's end."""
    head, _, tail = engine_id.rpartition("-")
    return tail if head and tail else engine_id[-8:]


def cell_text(cell: Cell) -> Text:
    return Text(cell[0], style=cell[1], no_wrap=True, overflow="ellipsis")


class CallsTable(DataTable[Text]):
    """One row per call keyed by call_sid, vim keys added."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    def __init__(self, *, latency_alert_s: float = 2.0, id: str | None = None) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, id=id)
        for key, label, width in COLUMNS:
            self.add_column(label, key=key, width=width)
        self.latency_alert_s = latency_alert_s
        self.engines_shown = False
        self.variants_shown = False
        self._reselect = ""  # the call selected before the columns changed
        self._call_order: list[str] = []  # call_sids, as the rows stand
        self._call_cells: dict[str, tuple[Cell, ...]] = {}  # what each row shows now

    def show_engines(self, shown: bool) -> None:
        """Show (a fleet console) or hide the engine column; rows are rebuilt at the
        next `show_calls`."""
        if shown == self.engines_shown:
            return
        self.engines_shown = shown
        self._rebuild_columns()

    def _extra_columns(self) -> tuple[tuple[str, str, int], ...]:
        return (((VARIANT_COLUMN,) if self.variants_shown else ())
                + ((ENGINE_COLUMN,) if self.engines_shown else ()))

    def _rebuild_columns(self) -> None:
        selected = self.selected_sid()
        self.clear(columns=True)
        for key, label, width in COLUMNS + self._extra_columns():
            self.add_column(label, key=key, width=width)
        self._call_order, self._call_cells = [], {}
        self._reselect = selected

    def _cells(self, call: CallView, model: ConsoleModel) -> tuple[Cell, ...]:
        cells = row_cells(call, model, self.latency_alert_s)
        if self.variants_shown:
            cells += ((call.variant.rpartition("/")[2] or "-", "dim" if call.ended else ""),)
        if self.engines_shown:
            cells += ((engine_label(call.engine_id), "dim" if call.ended else "cyan"),)
        return cells

    def selected_sid(self) -> str:
        """The call under the cursor ("" when the table is empty)."""
        if self.row_count == 0:
            return ""
        row = min(self.cursor_row, self.row_count - 1)
        if row < 0:
            return ""
        key = self.coordinate_to_cell_key(self.cursor_coordinate._replace(row=row)).row_key
        return str(key.value or "")

    def show_calls(self, calls: Sequence[CallView], model: ConsoleModel) -> None:
        """Make the rows match `calls` (in this order), touching only what changed."""
        if not self.variants_shown and any(call.variant for call in calls):
            self.variants_shown = True
            self._rebuild_columns()
        order = [call.call_sid for call in calls]
        if order != self._call_order:
            self._reorder(calls, order, model)
        # Update only the cells whose text or style changed (new rows are up to date).
        keys = COLUMN_KEYS + tuple(key for key, _label, _width in self._extra_columns())
        for call in calls:
            cells = self._cells(call, model)
            shown = self._call_cells.get(call.call_sid)
            if shown == cells:
                continue
            for index, cell in enumerate(cells):
                if shown is None or shown[index] != cell:
                    self.update_cell(call.call_sid, keys[index], cell_text(cell))
            self._call_cells[call.call_sid] = cells

    def _reorder(self, calls: Sequence[CallView], order: list[str],
                 model: ConsoleModel) -> None:
        selected = self.selected_sid() or self._reselect
        self._reselect = ""
        wanted = set(order)
        kept = [sid for sid in self._call_order if sid in wanted]
        if order[:len(kept)] == kept:
            # The usual case (calls ended or started): remove and append, no rebuild.
            for sid in self._call_order:
                if sid not in wanted:
                    self.remove_row(sid)
                    self._call_cells.pop(sid, None)
            for call in calls[len(kept):]:
                self._add_call(call, model)
        else:
            self.clear()
            self._call_cells.clear()
            for call in calls:
                self._add_call(call, model)
        self._call_order = order
        # Row positions moved: put the cursor back on the call, not the position.
        if selected in wanted and self.selected_sid() != selected:
            self.move_cursor(row=order.index(selected), animate=False)

    def _add_call(self, call: CallView, model: ConsoleModel) -> None:
        cells = self._cells(call, model)
        self.add_row(*(cell_text(cell) for cell in cells), key=call.call_sid)
        self._call_cells[call.call_sid] = cells
