"""One event to its webhooks: bodies, signatures receivers verify, egress, hostile receivers, scheduling."""
