"""Speculative decoding: drafters propose, ``verify`` decides what survives (see verify.py)."""
