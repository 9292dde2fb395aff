"""Which webhooks get an event: the subscriptions held in memory, per-webhook options and filters."""
