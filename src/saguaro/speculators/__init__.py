"""Speculators and draft loading: below the engine, which they never import."""

from saguaro.speculators.base import Proposal, Row, Speculator, head_to_vocab, repeat_last, right_pad
from saguaro.speculators.draft import check_vocabulary, load_draft
from saguaro.speculators.feature import FeatureSpeculator
from saguaro.speculators.neural import NeuralSpeculator, draft_k
from saguaro.speculators.ngram import NgramSpeculator

__all__ = ["FeatureSpeculator", "NeuralSpeculator", "NgramSpeculator", "Proposal", "Row", "Speculator",
           "check_vocabulary", "draft_k", "head_to_vocab", "load_draft", "repeat_last", "right_pad"]
