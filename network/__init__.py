"""Weights, plans and the engine. Knows nothing about any WebUI."""
