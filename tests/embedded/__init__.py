"""The embedded servers and `webhookd dev`."""
