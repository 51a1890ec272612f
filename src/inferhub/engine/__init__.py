"""The inference engine: sequences, paged KV cache, scheduler, runner, sampler."""
