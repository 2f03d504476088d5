"""Operations plane: events, bus, supervisor API, metrics, spend ledger, call history."""
