"""famserve.engine: the TransformerFAM streaming engine."""
