"""Methods: a recipe's sections turned into compositions of the algorithms (``weights.round_weight``: grid,
incoherence transform, rounding, greedy passes, low-rank branch). The algorithm packages below never read a
recipe; the pipeline's stages call these."""
