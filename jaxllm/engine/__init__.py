"""Device-free engine: requests, block manager, scheduler, detokenizer, engine loop. No jax here."""
