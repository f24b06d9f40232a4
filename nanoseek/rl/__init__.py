"""Reasoning by reinforcement learning: rule-based rewards, rollouts, GRPO and its variants, SFT, evaluation."""
