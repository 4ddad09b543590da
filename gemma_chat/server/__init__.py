"""``gemma serve``: OpenAI's and Ollama's HTTP APIs over one loaded model.

    app = create_app(backend, names=["gemma-3-270m", "270m"])
    uvicorn.run(app, host="127.0.0.1", port=8080)

:mod:`.app` has the routes, authentication and CORS; :mod:`.openai` and :mod:`.ollama`
translate each API's requests and responses; :mod:`.core` checks requests and runs them,
through parallel slots (:mod:`gemma_chat.backends.slots`) or one at a time.
"""

from .app import create_app
from .core import APIError, Job, Server, StopStrings

__all__ = ["APIError", "Job", "Server", "StopStrings", "create_app"]
