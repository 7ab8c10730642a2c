"""``elmreg serve``: an OpenAI-compatible HTTP server over the registry that picks the expert itself.

A client of the Python API (like ``experiments``): ``service`` resolves models and routes by RoE, ``engine``
batches prompts across requests and experts on one backbone, ``audit`` writes routing decisions off the request
path, ``auth`` checks API keys, ``app`` is the FastAPI application (its routers ``openai_api`` and
``operations``, what they are given in ``dependencies``, token streams in ``streaming``) and ``server`` runs it
under uvicorn.
"""
