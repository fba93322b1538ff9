"""Configuration: the structured schemas (Hydra ConfigStore), their validation, and run identity (canonical config, run key)."""
