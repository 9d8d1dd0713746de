"""Hashing, overlap, drift and planning: everything computed from tensor bytes."""
