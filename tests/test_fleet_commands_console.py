"""The console side of the fleet console: calls keep their owning engine (snapshot and
events), the table labels it, and `--redis` says it is deprecated."""

from __future__ import annotations

import pytest

from console.calls_table import engine_label, row_cells
from console.cli import build_parser, make_source
from console.model import ConsoleModel
from console.redis_source import RedisEventSource
from engine.bus.events import CallStarted, EventStamper
from engine.supervision.api_schema import CallSnapshot, Snapshot


def test_calls_keep_the_engine_that_owns_them() -> None:
    model = ConsoleModel(clock=lambda: 1000.0)
    model.apply_snapshot(Snapshot(cursor="1-0", server_time=1000.0, calls=[
        CallSnapshot(call_sid="CA1", engine_id="host-11-aaaaaa", started_at=990.0)]))
    model.apply_event(EventStamper("host-22-bbbbbb").stamp(
        CallStarted(call_sid="CA2", from_number="+15550100002")))
    assert model.calls["CA1"].engine_id == "host-11-aaaaaa"
    assert model.calls["CA2"].engine_id == "host-22-bbbbbb"
    assert [c.call_sid for c in model.sorted_calls("bbbbbb")] == ["CA2"]  # filterable
    assert engine_label("host-22-bbbbbb") == "bbbbbb"
    assert engine_label("engine-a") == "a"
    assert engine_label("") == ""
    assert len(row_cells(model.calls["CA1"], model)) == 7  # the column is the table's


def test_redis_console_is_deprecated_but_still_reads(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    source = make_source(build_parser().parse_args(["--redis", "redis://127.0.0.1:6379"]))
    assert isinstance(source, RedisEventSource) and source.readonly
    err = capsys.readouterr().err
    assert "--redis is deprecated" in err and "--engine" in err


async def test_a_fleet_console_shows_the_engine_column() -> None:
    from console.app import SupervisorConsole
    from console.calls_table import CallsTable
    from console.client import ConnectionChanged
    from engine.supervision.api_schema import Hello
    from tests.test_console_app import ScriptedSource

    source = ScriptedSource([
        ConnectionChanged("connected", "host-11-aaaaaa"),
        Hello(engine_id="host-11-aaaaaa", fleet=True),
        Snapshot(cursor="1-0", server_time=1000.0, calls=[
            CallSnapshot(call_sid="CA1", engine_id="host-11-aaaaaa", started_at=990.0),
            CallSnapshot(call_sid="CA2", engine_id="host-22-bbbbbb", started_at=995.0)])])
    app = SupervisorConsole(source, clock=lambda: 1000.0, flush_interval_s=0.05,
                            watch_terminal=False)
    async with app.run_test(size=(120, 30)) as pilot:
        table = app.query_one(CallsTable)
        for _ in range(100):
            if table.row_count == 2:
                break
            await pilot.pause(0.05)
        assert table.engines_shown and table.row_count == 2
        labels = [str(table.get_cell(sid, "engine")) for sid in ("CA1", "CA2")]
    assert labels == ["aaaaaa", "bbbbbb"]
