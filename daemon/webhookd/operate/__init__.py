"""Operator commands: `webhookd deliveries ...`, `webhookd endpoints ...` and `webhookd webhooks ...`, run against
the daemon's Postgres (and, for a replay, Kafka).

They read and change only the `webhookd` schema (and read the subscriptions table), so they work while daemons
run: a running daemon picks up enables, disables, limits and replays at its next sync or retry poll, and a
webhook's options within 2 seconds.
"""
