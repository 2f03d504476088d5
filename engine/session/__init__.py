"""The call: its session (state machine, ports to the edge) and its conversation."""
