"""Shared test helpers: checkpoint factories, bundle builders, hostile-input generators."""
