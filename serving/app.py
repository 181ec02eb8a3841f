"""The entry point Serve imports (`import_path: serving.app:app` in serving/config.yaml); the API is intentops.api.

`serve run serving/config.yaml` from the project root. Binding creates nothing until Serve runs it.
"""

from intentops.api.service import IntentService

app = IntentService.bind()
