"""Baselines of Table III: RL agents trained with rejax, and the shared evaluation protocol."""
