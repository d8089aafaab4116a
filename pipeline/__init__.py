"""Batch zero-shot image classification pipeline."""
