"""Inference pipelines built on the models."""
