"""Readers and writers of every Lever-Plus file: beam JSON, RL JSON, embeddings, checkpoints; atomic writes."""
