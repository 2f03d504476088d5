"""Modal screens: confirmation (defaults to No), transfer destination picker, help."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

# What a typed transfer number may look like: E.164 or a short internal extension.
PHONE_NUMBER = re.compile(r"^\+?[0-9]{3,15}$")


class ConfirmScreen(ModalScreen[bool]):
    """Yes/No for a destructive action. No has the focus, Esc and n answer No: an Escape
    split on a slow SSH link can only ever cancel."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "answer(False)", "No"),
        Binding("n", "answer(False)", "No"),
        Binding("y", "answer(True)", "Yes"),
        Binding("left", "app.focus_previous", "Previous", show=False),
        Binding("right", "app.focus_next", "Next", show=False),
    ]

    def __init__(self, question: str, detail: str = "") -> None:
        super().__init__()
        self.question = question
        self.detail = detail

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="dialog"):
            yield Label(Text(self.question, style="bold"), id="confirm-question")
            if self.detail:
                yield Label(self.detail, id="confirm-detail")
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class TransferScreen(ModalScreen[tuple[str, str] | None]):
    """Pick a configured destination or type a number. Returns (name, number)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, call_label: str, destinations: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self.call_label = call_label
        self.destinations = list(destinations)

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="dialog"):
            yield Label(Text(f"Transfer {self.call_label} to:", style="bold"))
            options = [Option(f"{name}  {number}", id=str(index))
                       for index, (name, number) in enumerate(self.destinations)]
            yield OptionList(*options, id="destinations")
            yield Input(placeholder="or type a number, e.g. +15551230000", id="number")
            yield Label("", id="transfer-error")

    def on_mount(self) -> None:
        if self.destinations:
            self.query_one(OptionList).focus()
        else:
            self.query_one(OptionList).display = False
            self.query_one(Input).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        index = int(event.option.id or 0)
        self.dismiss(self.destinations[index])

    def on_input_submitted(self, event: Input.Submitted) -> None:
        number = event.value.strip().replace(" ", "").replace("-", "")
        if not PHONE_NUMBER.match(number):
            self.query_one("#transfer-error", Label).update(
                Text(f"not a phone number: {event.value!r}", style="bold red"))
            return
        self.dismiss(("typed number", number))

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """The keys, built from the app's live bindings (so read-only mode lists fewer)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"),
        Binding("question_mark", "close", "Close"),
        Binding("q", "close", "Close"),
    ]

    def __init__(self, keys: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = list(keys)

    def compose(self) -> ComposeResult:
        text = Text()
        text.append("Switchboard console — keys\n\n", style="bold")
        for key, description in self.keys:
            text.append(f"  {key:<14}", style="bold cyan")
            text.append(f"{description}\n")
        text.append("\nEsc, ? or q closes this help.", style="dim")
        with Vertical(id="dialog", classes="dialog help"):
            yield Static(text, id="help-text")

    def action_close(self) -> None:
        self.dismiss(None)
