"""Model building blocks: attention over the paged cache, rotary embedding, norms, activations."""
