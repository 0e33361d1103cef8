"""`llada-serve`: an OpenAI-compatible HTTP server with dynamic batching of the diffusion sampler.

`api` (request and response bodies, pure), `batcher` (batches concurrent requests into sampler calls),
`metrics` (Prometheus), `app` (the Starlette routes). Needs the `[serve]` extra (Starlette, Uvicorn,
prometheus_client); the command is `llada_jax.cli.serve`.
"""
