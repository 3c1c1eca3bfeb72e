"""DreamBench evaluation: prompts, embeddings, metrics (METHOD.md's definitions) and reports."""
