"""What the gateway reports: per-worker stats, Prometheus metrics, the access log and JSON logs."""
