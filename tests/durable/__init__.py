"""What survives crashes and outages: retries, the attempt log, per-record order, kills, Postgres roles."""
