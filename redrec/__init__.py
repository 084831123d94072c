"""RED-Rec: cross-scenario LLM-enhanced two-tower recommender (one importable library)."""

__version__ = "0.1.0"
