"""The console's side of experiments: the Variant column, and pausing a variant (v)
behind a confirmation, against the supervisor API stand-in of the console tests."""

from __future__ import annotations

from console.calls_table import CallsTable
from console.screens import ConfirmScreen
from engine.bus.events import CallUpdated
from tests.test_console_app import ApiStandIn, commands, make_app, ready, server, until

__all__ = ["server"]  # the fixture


async def test_variant_column_appears_and_v_pauses_the_variant(server: ApiStandIn) -> None:
    app = make_app(server)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        table = app.query_one(CallsTable)
        assert not table.variants_shown  # no experiment: the table as it always was
        await pilot.press("v")  # nothing to pause on a call without a variant
        await pilot.pause(0.1)
        assert not isinstance(app.screen, ConfirmScreen)
        await server.publish(CallUpdated(call_sid="CA-C", variant="voice/espeak"))
        await until(pilot, lambda: table.variants_shown
                    and table.get_cell("CA-C", "variant").plain == "espeak", what="column")
        assert table.get_cell("CA-A", "variant").plain == "-"
        await pilot.press("v")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        screen = app.screen
        assert isinstance(screen, ConfirmScreen) and "voice/espeak" in screen.question
        await pilot.press("y")
        await until(pilot, lambda: len(app.replies) == 1, what="reply")
        assert commands(server) == [("pause_variant", "CA-C", "voice/espeak", None)]
        await pilot.press("V", "y")
        await until(pilot, lambda: len(app.replies) == 2, what="second reply")
        assert commands(server)[-1] == ("resume_variant", "CA-C", "voice/espeak", None)


async def test_a_readonly_console_cannot_pause_variants(server: ApiStandIn) -> None:
    app = make_app(server, readonly=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await server.publish(CallUpdated(call_sid="CA-C", variant="voice/espeak"))
        table = app.query_one(CallsTable)
        await until(pilot, lambda: table.variants_shown, what="column")
        await pilot.press("v")
        await pilot.pause(0.1)
        assert not isinstance(app.screen, ConfirmScreen) and server.commands == []
