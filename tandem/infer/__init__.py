"""Inference: the batched, KV-cached generation engine (tandem/infer/engine.py)."""
