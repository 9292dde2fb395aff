"""The command line and the operator commands, against a real Postgres (and Kafka, for a replay)."""
