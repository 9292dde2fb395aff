"""Which webhooks get an event: matching, filters, subscription changes, tenant isolation, per-webhook options."""
