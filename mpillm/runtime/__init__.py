"""What every rank runs: the engine loop, the step plan, the forward pass, the collectives."""
