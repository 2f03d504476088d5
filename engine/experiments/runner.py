"""The enabled experiment on live calls: assign, record, watch the guard rails.

For each new call the wiring asks `deps_for(session)`: the call is assigned a variant
(assignment.py), which is published (CallUpdated.variant: the console's column), logged
and written to the history, and that variant's pipeline deps are returned. At the call's
end its misunderstood turns are recorded with its variant, and every
`check_every_calls` ended calls (or `check_every_s`) the guard rails read the history and
pause a variant that is worse than the control by more than the margin: an alert (kind
"variant_paused", with the experiment, variant and reason), one log line. Paused
variants get no new calls; a supervisor may pause and resume one (supervisor commands).
In a fleet the pauses are shared by every engine and kept across restarts
(shared_pauses.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from engine.bus import events as ev
from engine.config.experiments import ExperimentConfig
from engine.experiments.assignment import Assigner, Assignment
from engine.experiments.guard import Breach, breaches
from engine.experiments.outcomes import VariantOutcomes, read_outcomes
from engine.experiments.shared_pauses import SharedPauses
from engine.log import get_logger
from engine.session.conversation import PipelineDeps

if TYPE_CHECKING:
    from engine.hub import OpsHub
    from engine.session.call_session import CallSession
    from engine.session.conversation import ConversationPipeline

log = get_logger(__name__)


class ExperimentRunner:
    def __init__(self, experiment: ExperimentConfig, deps: dict[str, PipelineDeps],
                 base: PipelineDeps, hub: OpsHub, assigner: Assigner | None = None) -> None:
        self.experiment = experiment
        self.deps = deps
        self.base = base
        self.hub = hub
        self.assigner = assigner or Assigner(experiment)
        self.assignments: dict[str, Assignment] = {}  # live calls' variants
        self._ended_since_check = 0
        self._last_check = time.monotonic()
        self._checking = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.built: list[Any] = []  # providers built for the variants (closed with the engine)
        # A fleet's pauses, shared through Redis (shared_pauses.py); None: this engine's own.
        self.shared: SharedPauses | None = None

    @property
    def paused(self) -> dict[str, str]:
        return self.assigner.paused

    def _bg(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- calls --------------------------------------------------------------------------

    def deps_for(self, session: CallSession) -> PipelineDeps:
        """The pipeline deps of the call's variant (the engine's when none is running)."""
        assignment = self.assigner.assign(session.from_number)
        if assignment is None:
            session.log.info("experiment.all_paused", experiment=self.experiment.name)
            return self.base
        sid = session.call_sid
        self.assignments[sid] = assignment
        session.log.info("experiment.assigned", experiment=assignment.experiment,
                         variant=assignment.variant, by_number=assignment.hashed)
        self.hub.publish(ev.CallUpdated(call_sid=sid, variant=assignment.label))
        if (view := self.hub.views.get(sid)) is not None:  # snapshots show it too
            view.variant = assignment.label
        history = self.hub.history
        if history is not None:
            self._bg(history.variant_assigned(sid, assignment.experiment, assignment.variant))
        return self.deps[assignment.variant]

    def track(self, session: CallSession, pipeline: ConversationPipeline) -> None:
        """Record the call's outcome once it has ended (its own task: the session
        cancels its tasks at the end)."""
        if session.call_sid in self.assignments:
            self._bg(self._after_end(session, pipeline))

    async def _after_end(self, session: CallSession, pipeline: ConversationPipeline) -> None:
        await session.wait_ended()
        assignment = self.assignments.pop(session.call_sid)
        history = self.hub.history
        if history is None:
            return
        await history.variant_outcome(session.call_sid, assignment.experiment,
                                      pipeline.policies.misunderstood_turns)
        self._ended_since_check += 1
        rails = self.experiment.guard_rails
        due = (self._ended_since_check >= rails.check_every_calls
               or time.monotonic() - self._last_check >= rails.check_every_s)
        if rails.enabled and due and not self._checking:
            await self.check_guard_rails()

    # -- guard rails --------------------------------------------------------------------

    async def check_guard_rails(self) -> list[Breach]:
        """Read the variants' outcomes and pause those in breach; the breaches found."""
        history = self.hub.history
        if history is None:
            return []
        self._checking = True
        self._ended_since_check = 0
        self._last_check = time.monotonic()
        exp = self.experiment
        try:
            end = time.time()
            start = end - exp.guard_rails.window_days * 86400
            outcomes = await history.read(lambda: read_outcomes(exp.name, start, end))
            control = outcomes.get(exp.control, VariantOutcomes(exp.control))
            others = [o for name, o in outcomes.items()
                      if name != exp.control and name not in self.paused]
            found = await asyncio.to_thread(breaches, control, others, exp.guard_rails)
        except Exception as exc:  # a failed check must not touch any call
            log.warning("experiment.check_failed", experiment=exp.name, error=str(exc))
            return []
        finally:
            self._checking = False
        for breach in found:
            self.pause(breach.variant, f"guard rail: {breach.reason}", "guard_rail",
                       breach.metric)
        return found

    def pause(self, variant: str, why: str, by: str, metric: str = "") -> str | None:
        """Pause a variant: None when done, else why not."""
        if self.experiment.variant(variant) is None:
            return f"experiment {self.experiment.name} has no variant {variant!r}"
        if not self.assigner.pause(variant, why):
            return f"variant {variant} is already paused"
        if self.shared is not None:
            self.shared.write(variant, why)
        # The alert is the one log line (ops.alert), the event and the console's notice.
        self.hub.alert(None, "variant_paused", "warning",
                       f"experiment {self.experiment.name}: variant {variant} paused ({why})",
                       {"experiment": self.experiment.name, "variant": variant,
                        "paused": True, "by": by, "metric": metric})
        return None

    def resume(self, variant: str, by: str) -> str | None:
        if self.experiment.variant(variant) is None:
            return f"experiment {self.experiment.name} has no variant {variant!r}"
        if not self.assigner.resume(variant):
            return f"variant {variant} is not paused"
        if self.shared is not None:
            self.shared.write(variant, None)
        log.info("experiment.variant_resumed", experiment=self.experiment.name,
                 variant=variant, by=by)
        return None

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait for the outcomes of ended calls to be written (tests, shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def share_pauses(self, shared: SharedPauses) -> None:
        """Follow the fleet's pauses from now on (the ones in force applied first)."""
        self.shared = shared
        await shared.sync(self.assigner)
        shared.start(self.assigner)

    async def aclose(self, timeout: float = 2.0) -> None:
        """Let the ended calls' outcomes be written (briefly), then stop watching."""
        if self.shared is not None:
            await self.shared.stop()
        await self.drain(timeout)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
