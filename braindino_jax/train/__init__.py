"""Pretraining: configs, train state, sharding, optimizer and schedules, the step, checkpoints."""
