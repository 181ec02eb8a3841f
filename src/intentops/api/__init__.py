"""The HTTP API: a Ray Serve deployment (`service.IntentService`) over `intentops.inference.predictor.Predictor`.

schemas: request and response models, request checks, response rows. settings: the `serving` settings and the
bundle they name. model: the loaded model, its slot (load, warm up, hot swap, pointer watch). batching: the
pooling of concurrent requests' texts into model calls. recorder: what a model call leaves behind (metrics, ledger, profiles).
requestlog: the replica's JSON-lines request log. middleware: auth, request metrics and the log line per
request. service: the FastAPI routes and the deployment that wires the rest together.
"""
