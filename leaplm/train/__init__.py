"""Training-time tooling: data for self-distilled draft heads."""
