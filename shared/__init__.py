"""Code shared by the gateway, vision and decoder roles."""
