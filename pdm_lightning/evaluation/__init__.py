"""DreamBench evaluation: prompts, embeddings, metrics (defined in docs/method.md) and reports."""
