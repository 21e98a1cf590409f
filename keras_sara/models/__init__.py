"""Robot policy builders: a Point Cloud Transformer policy whose attention is SARA."""

from keras_sara.models.pct import ClearPadding, MaskedMaxMeanPool, build_pct_policy

__all__ = ["ClearPadding", "MaskedMaxMeanPool", "build_pct_policy"]
