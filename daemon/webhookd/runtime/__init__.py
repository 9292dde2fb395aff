"""The process: lifecycle, worker processes, probes, metrics, logs, configuration and transport security."""
