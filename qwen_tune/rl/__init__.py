"""The pieces of reinforcement learning: rollouts, PPO's math, the actor and critics, rewards from functions and models."""
