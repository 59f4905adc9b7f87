"""Weight-derived metrics, pure functions of a model's weights: circuits, headline metrics and
diagnostics, exact attribution, mechanism metrics."""
