"""The intent API served by Ray Serve (see app.py and config.yaml)."""
