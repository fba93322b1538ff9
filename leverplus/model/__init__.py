"""The pointer network that selects in-context examples, its decoding, and building/loading it."""
