"""Replicas that know each other: membership in Redis, model-affinity routing, the hop.

A replica publishes what it holds (membership.py); a synchronous request for a model that a
peer holds with room is forwarded there, one hop at most (routing.py picks, forwarder.py
sends over hop_client.py); everything else is served locally. docs/operations.md, "Routing
between replicas".
"""
