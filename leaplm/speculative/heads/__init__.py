"""Trained draft heads: the modules that ``leaplm train-drafter`` trains and the drafters that load them."""
