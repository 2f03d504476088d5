"""Money: the price table, per-call ledgers, budgets, the Realtime API comparison."""
