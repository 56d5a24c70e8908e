"""The roles of the Pixtral service, each run as its own process: `python -m services.<role>`."""
