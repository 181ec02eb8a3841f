"""Production monitoring: drift checks and the hooks that turn them into retraining runs."""
