"""The configuration: TOML validated by pydantic models, with errors naming file and key."""
