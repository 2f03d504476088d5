"""The transcript panel: the selected call's lines, who said them, what was cut off, with
toolong's tail mode (new lines scroll into view only while the reader is at the bottom)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Static

from console.formatting import update_static
from console.view_state import CallView, LineView, ToolLine

_SPEAKER = {"caller": ("CALLER", "bold cyan"), "agent": ("AGENT ", "bold green"),
            "supervisor": ("SUPERV", "bold magenta"), "system": ("SYSTEM", "dim")}
# What a failed tool call came to, after its name and arguments.
_TOOL_FAILED = {"error": "failed", "timeout": "timed out", "rejected": "rejected",
                "discarded": "discarded (the caller spoke)"}
_ARGS_CHARS = 60


def tool_arguments(tool: ToolLine) -> str:
    """`{order_id: 4471}`: short, for one transcript line."""
    text = ", ".join(f"{k}: {v}" for k, v in tool.arguments.items())
    if len(text) > _ARGS_CHARS:
        text = text[:_ARGS_CHARS - 1].rstrip() + "…"
    return "{" + text + "}"


def render_tool(tool: ToolLine) -> Text:
    """`🔧 looked up order_status {order_id: 4471} → shipped`; a failed one is marked."""
    text = Text(no_wrap=False)
    text.append("  🔧    ", style="bold blue")
    if not tool.failed:
        text.append("looked up ", style="dim")
    text.append(tool.name, style="bold blue")
    text.append(" " + tool_arguments(tool), style="blue")
    if tool.failed:
        text.append(f" ✗ {_TOOL_FAILED.get(tool.outcome, tool.outcome)}", style="bold red")
        if tool.outcome == "timeout" and tool.latency_s:
            text.append(f" after {tool.latency_s:.1f} s", style="red")
        if tool.summary:
            text.append(f": {tool.summary}", style="red")
    else:
        text.append(f" → {tool.summary or 'done'}")
    return text


def render_line(line: LineView) -> Text:
    if line.tool is not None:
        return render_tool(line.tool)
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
