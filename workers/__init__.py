"""Background workers: processes that run beside the ingress (the outbox relay...)."""
