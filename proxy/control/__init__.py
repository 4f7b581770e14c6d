"""The control plane: the rollout controller, reloads, persistence, workers, metrics
exposition and the admin API."""
