"""Pruning (structured, unstructured, low-rank): to come."""
