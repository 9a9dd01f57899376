"""The training step: :class:`GeoLoRAOptimizer` (orchestration), the integrator's pure tensor
functions, the base rules (directions and their state), the rank rules, the bucketing of adapters
that are stepped together, the batched copies into their factors, and the guard that keeps
ordinary optimizers off the factors."""
