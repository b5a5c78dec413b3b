"""Administration: the queue service, its HTTP API (with /metrics) and the CLI's client."""
