"""Caller scenarios: small TOML files that script what a simulated caller does.

```toml
name = "opening-hours"
from = "+15550100001"
[[steps]]
say = "What are your opening hours?"      # waits for the agent to finish first
expect = "hours"                          # the FAQ entry that answers it (scored)
[[steps]]
say = "And where are you?"
barge_in = true                           # speak over the agent after `after_s`
after_s = 0.8
expect = "location"
[[steps]]
say = "Do you sell gift cards?"
expect = "none"                           # out of scope: no FAQ entry may answer it
[[steps]]
dtmf = "0"
[[steps]]
pause = 2.0                               # silence, in seconds
[[steps]]
hangup = true
```
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

# `expect` of a line no FAQ entry should answer.
OUT_OF_SCOPE = "none"


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    say: str | None = None
    dtmf: str | None = None
    pause: float | None = None
    hangup: bool = False
    # Start talking while the agent speaks (`after_s` after its audio begins).
    barge_in: bool = False
    after_s: float = 0.5
    # How long to wait for the agent to finish before this step (seconds).
    wait_timeout_s: float = 30.0
    # The FAQ entry id that should answer this line, or OUT_OF_SCOPE; the demo scores it.
    expect: str | None = None

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        actions = [self.say is not None, self.dtmf is not None, self.pause is not None,
                   self.hangup]
        if sum(actions) != 1:
            raise ValueError("each step needs exactly one of: say, dtmf, pause, hangup")
        if self.dtmf is not None and any(c not in "0123456789*#" for c in self.dtmf):
            raise ValueError(f"invalid DTMF digits {self.dtmf!r}")
        if self.expect is not None and self.say is None:
            raise ValueError("only a `say` step can expect an answer")
        return self


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = "call"
    from_number: str = Field(default="+15550100001", alias="from")
    to_number: str = Field(default="+15550100000", alias="to")
    # An espeak voice: this caller speaks with it instead of the neural caller voice.
    voice: str | None = None
    # Hang up when the script ends (after the agent's last answer).
    hangup_at_end: bool = True
    # Wait for the greeting to finish before the first step.
    wait_for_greeting: bool = True
    steps: list[Step] = Field(default_factory=list)

    @classmethod
    def from_file(cls, path: str | Path) -> Scenario:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read scenario {p}: {exc}") from exc
        data.setdefault("name", p.stem)
        return cls.model_validate(data)

    @classmethod
    def from_lines(cls, lines: list[str], name: str = "say") -> Scenario:
        return cls(name=name, steps=[Step(say=line) for line in lines])

    def expected(self) -> dict[str, str]:
        """Scripted line -> the FAQ entry id (or OUT_OF_SCOPE) expected to answer it."""
        return {step.say: step.expect for step in self.steps
                if step.say is not None and step.expect is not None}


def bundled_scenarios_dir() -> Path:
    return Path(__file__).with_name("scenarios")
