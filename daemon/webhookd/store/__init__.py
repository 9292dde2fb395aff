"""The daemon's Postgres schema: ordered SQL migrations and the subscriptions table's change trigger."""
