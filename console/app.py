"""The supervisor console: the live view (`console/live_view.py`) plus the supervisor's keys —
help, filter, pause, and the acting keys (take over, escalate, transfer, hang up) with
their confirmation dialogs.

Acting keys capture the selected call when pressed, so a re-sort while a dialog is open
never redirects a hang-up to another call.
"""

from __future__ import annotations

from typing import ClassVar

from textual import on, work
from textual.binding import Binding, BindingType
from textual.widgets import Input

from console.bars import TakeoverBar
from console.formatting import fmt_duration
from console.live_view import LiveView
from console.screens import ConfirmScreen, HelpScreen, TransferScreen
from console.view_state import CallView
from engine.supervision.api_schema import CommandName

ACTING_ACTIONS = frozenset({"take_over", "escalate", "transfer", "hang_up"})
VARIANT_ACTIONS = frozenset({"pause_variant", "resume_variant"})


class SupervisorConsole(LiveView):
    """Live calls, transcripts, latency and spend; take over, transfer, hang up."""

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
        Binding("v", "pause_variant", "Pause variant", show=False),
        Binding("V", "resume_variant", "Resume variant", show=False),
    ]
    # Described for the help screen (the table's own keys are not app bindings).
    NAVIGATION_HELP: ClassVar[list[tuple[str, str]]] = [
        ("j / k, ↓ / ↑", "move between calls (scroll in the transcript)"),
        ("enter", "focus the selected call's transcript"),
        ("G", "transcript: jump to the newest line"),
        ("esc", "back to the calls / clear the filter / hand back"),
        ("v / V", "pause / resume the selected call's experiment variant"),
    ]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in VARIANT_ACTIONS:
            call = self.selected_call()
            return False if self.readonly else (None if call is None or not call.variant
                                                else True)
        if action in ACTING_ACTIONS:
            if self.readonly:
                return False  # hidden from the footer and refused
            if action == "take_over" and self._takeover_bar.call_sid:
                return True  # t hands back
            call = self.selected_call()
            if call is None or call.ended:
                return None  # shown greyed out: nothing to act on
        return True

    # -- looking ---------------------------------------------------------------------------

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
        elif self._takeover_bar.call_sid:
            self._hand_back(self._takeover_bar.call_sid)
        else:
            self._table.focus()

    # -- acting ----------------------------------------------------------------------------

    def action_take_over(self) -> None:
        if self._takeover_bar.call_sid:
            self._hand_back(self._takeover_bar.call_sid)
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

    def action_pause_variant(self) -> None:
        self._variant_command("pause_variant", "Pause", "it gets no new calls (its share "
                              "goes to the others) until resumed with V")

    def action_resume_variant(self) -> None:
        self._variant_command("resume_variant", "Resume", "it gets new calls again")

    def _variant_command(self, command: CommandName, verb: str, detail: str) -> None:
        call = self.selected_call()
        if call is not None and call.variant:
            self._confirm_and_send(command, call.call_sid,
                                   f"{verb} variant {call.variant}?", detail,
                                   text=call.variant)

    def call_label(self, call: CallView) -> str:
        who = call.from_number or "unknown caller"
        return f"{who} ({call.call_sid})"

    def _call_detail(self, call: CallView) -> str:
        return (f"state {call.state}, {fmt_duration(self.model.duration_s(call))} on the "
                f"line, ${call.cost_usd:.3f} so far")

    # -- command flows (workers: dialogs are awaited) --------------------------------------

    @work(group="commands")
    async def _confirm_and_send(self, command: CommandName, call_sid: str, question: str,
                                detail: str, text: str | None = None) -> None:
        if await self.push_screen_wait(ConfirmScreen(question, detail)):
            await self.send(command, call_sid, text=text)

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
        self._takeover_bar.close()
        self._table.focus()
        self.refresh_bindings()
        self.run_worker(self.send("hand_back", call_sid), group="commands")
