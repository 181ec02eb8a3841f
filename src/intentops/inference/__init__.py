"""Inference: the Predictor over a bundle, out-of-scope scoring, the bundle layout and the registry."""
