"""Tools the agent may call: config-defined HTTP endpoints and the built-ins (registry,
argument validation, the HTTP tool, one turn's rounds). The turn loop is
`engine/session/tool_turns.py`."""
