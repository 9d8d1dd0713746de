"""Loading bundles onto torch devices (torch, transformers, diffusers integrations)."""
