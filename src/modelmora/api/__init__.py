"""Thin routers over the service layer."""

import os

# The server starts model workers (fork, then exec) while grpc's threads are running. grpc's
# fork handlers then run in the child between fork and exec and can crash it: with gRPC calls
# in flight, 42 of 60 loads of a fake model failed, the first with the worker killed by
# SIGSEGV before it ran any of our code. The workers never use gRPC, so the handlers are
# turned off before grpc is first imported (in the server, only modules of this package
# import it). An explicit GRPC_ENABLE_FORK_SUPPORT in the environment still wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
