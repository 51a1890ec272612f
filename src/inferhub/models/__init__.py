"""Model definitions (Qwen2, Llama) and loaders (Hugging Face folders, GGUF files)."""
