"""Call sessions: the state machine of one call, turn-taking, barge-in, caps, handoff."""
