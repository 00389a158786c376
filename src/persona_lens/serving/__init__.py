"""Serving: an OpenAI-compatible HTTP API with per-request steering, per-token trait scores in
the stream, and a web page (``persona serve``; extra ``[serve]``).

``vectors`` loads the vector folder (content hashes, model check); ``protocol`` holds the typed
request models; ``resolve`` turns a request into an engine job (one place for validation);
``engine`` is the single worker that owns the model and decodes every request in one batch
(``kv`` merges KV caches, ``probe`` reads projections and runs guards, ``sampling`` and
``detokenize`` handle each row's tokens); ``app`` is the FastAPI application, ``responses``
builds the OpenAI-shaped bodies and ``errors`` the error shape; ``static/`` holds the page.
"""
