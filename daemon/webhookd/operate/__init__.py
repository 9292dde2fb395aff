"""Operator commands: `webhookd deliveries ...` and `webhookd endpoints ...`, run against the daemon's Postgres.

They read and change only the `webhookd` schema (and read the subscriptions table), so they work while daemons
run: a running daemon picks up enables, disables, limits and replays at its next sync or retry poll.
"""
