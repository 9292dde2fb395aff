"""The process: lifecycle, configuration, workers, TLS, probes and metrics, members, secrets kept secret."""
