"""Inputs: the Lever-Plus file formats, rewards, groups (one per query), padded batches, and loading a run's data."""
