"""Moved to `saguaro.speculators` (below the engine); kept for callers of the old path."""

from saguaro.speculators import NeuralSpeculator, NgramSpeculator, Proposal, Speculator, head_to_vocab

__all__ = ["NeuralSpeculator", "NgramSpeculator", "Proposal", "Speculator", "head_to_vocab"]
