"""Figures (returned, never shown) and ipywidgets explorers over labkit results."""
