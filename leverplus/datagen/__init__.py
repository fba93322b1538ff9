"""Data generation: RL candidates, scorers (the LVLMs), and the generate/inspect apps."""
