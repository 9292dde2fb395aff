"""What webhookd knows about each receiver: its breaker, rate limit, pacing, health state and their sharing."""
