"""Who is asking: API keys, their scopes, and which operation needs which scope.

Checked at every door: the ASGI edge (the REST fast path answers inference before FastAPI
runs, so a FastAPI dependency alone would leave it open) and a gRPC server interceptor. Keys
live, hashed, in the registry database, so the CLI manages them without a server and every
replica sees the same keys.
"""
