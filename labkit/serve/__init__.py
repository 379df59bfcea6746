"""A small, real paged-attention serving engine (work in progress: block manager and sequences so far)."""
