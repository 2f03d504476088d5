"""Money: the price table, per-call ledgers, daily and monthly budgets."""
