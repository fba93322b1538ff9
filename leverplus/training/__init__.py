"""Training: pure losses, schedules, the trainer (SFT -> RCE -> GRPO), the stage cache, and what training consumes."""
