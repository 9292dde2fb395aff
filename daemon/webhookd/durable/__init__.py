"""What must survive a crash, in Postgres: outcomes, retries, the attempt log, migrations and the connections."""
