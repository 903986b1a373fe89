"""Training: optimizer, steps and accumulation, continued-pretraining init, the loop and its actions, logging."""
