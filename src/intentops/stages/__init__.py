"""DVC stages: one module per stage in dvc.yaml, each a thin `main` over `run_*` functions; stages never import each other."""
