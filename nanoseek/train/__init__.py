"""Training: the pretraining / SFT loop, optimizers, schedules, checkpoints and distributed setup."""
