"""Plumbing shared by every maskprop service, written once: settings, the event bus and its
consume -> handle -> produce -> commit loop, the Redis store, wire codecs, logs, metrics,
health and graceful shutdown.  Services under services/ are thin adapters on top of it."""
