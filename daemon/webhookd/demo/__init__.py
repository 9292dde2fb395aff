"""`webhookd dev`: the whole walk on one machine, with sample webhooks, a receiver that checks every signature, and
(with `--cdc`) a Twenty-shaped database read by Debezium."""
