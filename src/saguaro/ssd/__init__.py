"""Speculative Speculative Decoding and Saguaro's three parts: fan-out, sampling, fallback."""
