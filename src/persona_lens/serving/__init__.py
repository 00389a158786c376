"""Serving: an OpenAI-compatible HTTP API with per-request steering, per-token trait scores in
the stream, and a web page (``persona serve``; extra ``[serve]``).

``vectors`` loads the vector folder (content hashes, model check); ``protocol`` holds the typed
request models and ``resolve`` checks them against the server's state (one place for
validation; limits in ``settings``); ``engine`` is the single worker that owns the model and
decodes every request as a row of one batch (``kv`` merges KV caches, ``probe`` reads
projections and runs guards, ``sampling``, ``detokenize`` and ``turns`` handle each row's
tokens, text and history); ``responses`` builds the OpenAI-shaped bodies, ``errors`` the error
shape, ``app`` the FastAPI application and ``server`` puts them together; ``static/`` is the
page.
"""
