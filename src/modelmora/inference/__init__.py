"""How a request becomes a result: queue, batcher, scheduler."""
