"""Batch inference: sources, backends, the streaming runner."""
