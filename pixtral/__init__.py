"""Generated from protos/pixtral/v1 by protos/generate.py: do not edit."""
