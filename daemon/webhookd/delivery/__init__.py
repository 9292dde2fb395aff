"""One event to its webhooks: fan-out, the scheduler's slots, the body, its signatures and the HTTP attempt."""
