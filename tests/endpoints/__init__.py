"""What webhookd knows about receivers: breakers, rate limits and pauses, shared across processes and the cluster."""
