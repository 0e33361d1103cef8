"""llada_jax: LLaDA, the large language diffusion model, in JAX/Flax."""

from llada_jax.block_diffusion import block_diffusion_objective
from llada_jax.config import Config, from_config_dict
from llada_jax.diffusion import (LossOutput, NoisyBatch, ar_objective, forward_process, next_token_loss,
                                 pretrain_loss, pretrain_objective, random_length_crop, sft_loss,
                                 sft_objective)
from llada_jax.events import read_events
from llada_jax.model import Transformer, abstract_model, apply, init_params
from llada_jax.objectives import Field, Objective, register as register_objective
from llada_jax.sampling import GenerateOutput, SamplingConfig, generate, generate_blocks
from llada_jax.train import TrainState, setup, train_and_evaluate

__version__ = "0.1.0"
