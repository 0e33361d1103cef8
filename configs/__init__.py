"""Config presets, importable as `llada_jax.configs` once the package is installed."""
