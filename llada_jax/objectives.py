"""Training objectives as values: one `Objective` record per `diffusion.objective`.

A record holds everything that differs between objectives, so the train step, the memory plan, the data
pipeline, serving and the converters read the record instead of comparing objective names:

  batch          the fields of a training batch: name -> `Field(axes, dtype)`; data builders yield them
                 (or a `driver` makes them), `train.setup` shards them, `plan.dry_run` sizes them
  loss           a pure function `(score_fn, batch, rng, *, config, reference, step) -> diffusion.LossOutput`
                 of a score function (llada_jax.diffusion.ScoreFn), the batch, a key, the run's Config,
                 the frozen reference model's score function (None unless `reference`) and the training
                 step (a traced int32; None in validation) for what changes over a run (a block-size
                 schedule)
  eval_metric    the name under which validation reports exp(loss) (a bound or an exact perplexity), or
                 None where exp(loss) means nothing (preference losses: their `metrics` are reported)
  causal         the attention mask the objective trains (`model.causal` must equal it)
  blocks         whether it trains a block-causal model (block diffusion: `model.block_size` > 0 iff so)
  chat           whether it trains a chat model (the default of `model.chat`, stored in checkpoints)
  reference      whether the run holds a frozen reference model: a copy of the starting parameters
                 (`train.init_from`'s, else the fresh init) kept in `TrainState.frozen`, sharded like the
                 parameters, checkpointed and restored with them, never differentiated nor optimised
  reference_adapters  under LoRA the reference is the base plus a frozen copy of the adapters as they
                 started (so it can be re-synced to the policy), instead of the bare base
  training_data  `(config, workdir, *, process_index, process_count) -> pipeline.TrainingData`
  eval_batches   `(config, tokenizer, *, process_index, process_count) -> list of host batches`
  inner_iterations  `config -> int`: optimizer updates per batch; a step with more than one scans over
                 them, giving update i the batch with every 'inner' axis (the second) at index i
  driver         None: the loop feeds each data batch to the jitted step (`train.SupervisedDriver`).
                 Else `(setup, training_data) -> driver`, an object the loop calls as
                 `driver(state, host_batch) -> (state, metrics)` and `driver.validate(state, eval_batches)`:
                 on-policy RL makes its batches from the data's prompts with the current policy
                 (llada_jax.rl).

The train step calls a record's loss through `compute_loss`, which adds a mixture-of-experts model's router
losses to every objective (the model returns its router statistics as values; nothing else adds them).

Adding an objective = one `register(Objective(...))` entry here, its data builder in llada_jax/data (or
an existing one) and its tests; config validation, the step, the plan and serving pick it up.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax import attention, block_diffusion, diffusion as diffusion_lib, grpo as grpo_lib, moe as moe_lib, rl
from llada_jax.data import pipeline


# The sizes a batch field's named axes take (`Field.shape`).
AXIS_SIZES = {
    "batch": lambda c: c.train.batch_size,        # rows
    "length": lambda c: c.train.seq_len,          # positions of a row
    "inner": lambda c: of(c).inner_iterations(c),  # one entry per optimizer update of the step
    "completion": lambda c: c.grpo.gen_length,    # generated positions (the end of a rollout row)
}


@dataclasses.dataclass(frozen=True)
class Field:
  """One batch field: its named axes (the first is always 'batch'; names in AXIS_SIZES) and numpy dtype."""

  axes: tuple[str, ...]
  dtype: str

  @property
  def rank(self) -> int:
    return len(self.axes)

  @property
  def inner(self) -> bool:
    """Whether the field holds one entry per inner iteration (its second axis)."""
    return self.axes[1:2] == ("inner",)

  def shape(self, config) -> tuple[int, ...]:
    return tuple(AXIS_SIZES[a](config) for a in self.axes)


# (score_fn, batch, rng, *, config: config.Config, reference: ScoreFn | None) -> LossOutput
LossFn = Callable[..., diffusion_lib.LossOutput]


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  batch: Mapping[str, Field]
  loss: LossFn
  eval_metric: str | None
  causal: bool
  chat: bool
  training_data: Callable[..., pipeline.TrainingData]
  eval_batches: Callable[..., list]
  reference: bool = False
  blocks: bool = False
  reference_adapters: bool = False
  inner_iterations: Callable[[Any], int] = lambda config: 1
  driver: Callable[..., Any] | None = None

  def batch_ranks(self) -> dict[str, int]:
    return {name: f.rank for name, f in self.batch.items()}

  def check_batch(self, batch: Mapping[str, Any]) -> None:
    """Raises ValueError naming the objective when `batch` lacks a field or has an unknown one."""
    if set(batch) != set(self.batch):
      raise ValueError(f"a '{self.name}' batch needs fields {sorted(self.batch)}; got {sorted(batch)}")


_REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
  if objective.name in _REGISTRY:
    raise ValueError(f"objective {objective.name!r} is registered twice")
  _REGISTRY[objective.name] = objective
  return objective


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> Objective:
  """The record of `name`; an unknown name is a config error naming the field and the choices."""
  if name not in _REGISTRY:
    raise ValueError(f"config field 'diffusion.objective' must be one of {names()}; got {name!r}")
  return _REGISTRY[name]


def of(config) -> Objective:
  """The record of a `Config`'s `diffusion.objective`."""
  return get(config.diffusion.objective)


def compute_loss(objective: Objective, score_fn, batch, rng: jax.Array, *, config, reference=None,
                 router_losses: bool = True, step: jax.Array | None = None) -> diffusion_lib.LossOutput:
  """`objective.loss`, plus a mixture-of-experts model's router losses: every call of the policy's
  `score_fn` returns its router statistics (`TokenScores.aux`); their mean adds
  `model.moe_aux_loss_weight` x load-balancing loss + `model.moe_z_loss_weight` x z-loss to the loss
  (`router_losses=False`, validation: only reported) and both, unweighted, with the per-expert load to
  the metrics (llada_jax.moe.router_losses). A dense model's loss is `objective.loss`'s, untouched."""
  stats = []

  def policy(*args, **options):
    scores = score_fn(*args, **options)
    if scores.aux is not None:
      stats.append(scores.aux)
    return scores

  out = objective.loss(policy, batch, rng, config=config, reference=reference, step=step)
  if not stats:
    return out
  m = config.model
  extra, metrics = moe_lib.router_losses(moe_lib.mean_stats(stats), aux_weight=m.moe_aux_loss_weight,
                                         z_weight=m.moe_z_loss_weight)
  return out._replace(loss=out.loss + extra if router_losses else out.loss,
                      metrics={**(out.metrics or {}), **metrics})


def training_data(config, workdir: str, **host: Any) -> pipeline.TrainingData:
  """Tokenizer + host-local training iterator of `config`'s objective (see `Objective.training_data`)."""
  return of(config).training_data(config, workdir, **host)


def eval_batches(config, tok, **host: Any) -> list[dict[str, np.ndarray]]:
  """The held-out batches of `config`'s objective, fixed for the run (see `Objective.eval_batches`)."""
  return of(config).eval_batches(config, tok, **host)


def _pretrain_loss(score_fn, batch, rng: jax.Array, *, config, reference=None, step=None) -> diffusion_lib.LossOutput:
  d = config.diffusion
  return diffusion_lib.pretrain_objective(score_fn, rng, tokens_BL=batch["tokens"], mask_id=d.mask_token_id,
                                          eps=d.noise_eps, random_length_prob=d.random_length_prob)


def _sft_loss(score_fn, batch, rng: jax.Array, *, config, reference=None, step=None) -> diffusion_lib.LossOutput:
  d = config.diffusion
  return diffusion_lib.sft_objective(score_fn, rng, tokens_BL=batch["tokens"], prompt_len_B=batch["prompt_len"],
                                     mask_id=d.mask_token_id, eps=d.noise_eps, valid_BL=batch["valid"])


def _ar_loss(score_fn, batch, rng: jax.Array, *, config, reference=None, step=None) -> diffusion_lib.LossOutput:
  del rng, config
  return diffusion_lib.ar_objective(score_fn, tokens_BL=batch["tokens"])


def _vrpo_loss(score_fn, batch, rng: jax.Array, *, config, reference, step=None) -> diffusion_lib.LossOutput:
  p, d = config.preference, config.diffusion
  return diffusion_lib.vrpo_objective(
      score_fn, reference, rng, chosen_BL=batch["chosen"], rejected_BL=batch["rejected"],
      prompt_len_B=batch["prompt_len"], valid_BL=batch["valid"], mask_id=d.mask_token_id, beta=p.beta,
      n_time=p.n_time, n_mask=p.n_mask, antithetic=p.antithetic, estimator=p.estimator, eps=d.noise_eps)


def _ar_dpo_loss(score_fn, batch, rng: jax.Array, *, config, reference, step=None) -> diffusion_lib.LossOutput:
  del rng
  return diffusion_lib.exact_dpo_objective(score_fn, reference, chosen_BL=batch["chosen"],
                                           rejected_BL=batch["rejected"], prompt_len_B=batch["prompt_len"],
                                           valid_BL=batch["valid"], beta=config.preference.beta)


_ROWS, _ROW = ("batch", "length"), ("batch",)
_PACKED = {"tokens": Field(_ROWS, "int32")}

PRETRAIN = register(Objective(
    name="pretrain", batch=_PACKED, loss=_pretrain_loss, eval_metric="eval_ppl_bound", causal=False,
    chat=False, training_data=pipeline.packed_training_data, eval_batches=pipeline.packed_eval_batches))

# SFT batches: tokens [B, L]; prompt lengths [B]; `valid` [B, L] = positions up to the batch's longest
# prompt + response (EOS padding counts up to there, as in the reference's pad-to-batch-max, while shapes
# stay static).
SFT = register(Objective(
    name="sft", batch={"tokens": Field(_ROWS, "int32"), "prompt_len": Field(_ROW, "int32"), "valid": Field(_ROWS, "bool")},
    loss=_sft_loss, eval_metric="eval_ppl_bound", causal=False, chat=True,
    training_data=pipeline.sft_training_data, eval_batches=pipeline.sft_eval_batches))

# The autoregressive baseline: next-token prediction under a causal mask; validation is the exact NLL.
AR = register(Objective(
    name="ar", batch=_PACKED, loss=_ar_loss, eval_metric="eval_ppl", causal=True, chat=False,
    training_data=pipeline.packed_training_data, eval_batches=pipeline.packed_eval_batches))

# Preference pairs: the chosen and the rejected response after one shared prompt, both EOS-padded to the
# batch's common length (`valid`), as SFT rows are (llada_jax.data.preference).
_PAIRS = {"chosen": Field(_ROWS, "int32"), "rejected": Field(_ROWS, "int32"), "prompt_len": Field(_ROW, "int32"),
          "valid": Field(_ROWS, "bool")}

# VRPO (LLaDA 1.5): DPO on ELBO estimates against a frozen reference (the starting SFT model), with the
# sample budget, allocation and antithetic sharing of `config.preference`.
VRPO = register(Objective(
    name="vrpo", batch=_PAIRS, loss=_vrpo_loss, eval_metric=None, causal=False, chat=True,
    training_data=pipeline.preference_training_data, eval_batches=pipeline.preference_eval_batches,
    reference=True))

# Exact DPO for the causal baseline: the same pairs, exact log-likelihoods.
AR_DPO = register(Objective(
    name="ar_dpo", batch=_PAIRS, loss=_ar_dpo_loss, eval_metric=None, causal=True, chat=True,
    training_data=pipeline.preference_training_data, eval_batches=pipeline.preference_eval_batches,
    reference=True))


def _grpo_loss(score_fn, batch, rng: jax.Array, *, config, reference=None, step=None) -> diffusion_lib.LossOutput:
  del rng, reference  # the masks and the reference's log-probabilities come with the rollouts (llada_jax.rl)
  g = config.grpo
  return grpo_lib.grpo_objective(
      score_fn, tokens_BL=batch["tokens"], valid_BL=batch["valid"], masked_BL=batch["masked"],
      completion_mask_BC=batch["completion_mask"], advantages_B=batch["advantages"],
      old_logp_BC=batch["old_logp"], ref_logp_BC=batch["ref_logp"], mask_id=config.diffusion.mask_token_id,
      clip_eps=g.clip_eps, beta=g.beta)


# diffu-GRPO (d1): the batch is one step's scored rollouts, made by llada_jax.rl from the data's prompts:
# rows [left-padded prompt | completion], the completion's loss mask, group advantages, and per inner
# iteration the one-pass mask with the old policy's and the reference's log-probabilities under it.
GRPO = register(Objective(
    name="grpo", batch={"tokens": Field(_ROWS, "int32"), "valid": Field(_ROWS, "bool"),
                        "completion_mask": Field(("batch", "completion"), "bool"),
                        "advantages": Field(_ROW, "float32"),
                        "masked": Field(("batch", "inner", "length"), "bool"),
                        "old_logp": Field(("batch", "inner", "completion"), "float32"),
                        "ref_logp": Field(("batch", "inner", "completion"), "float32")},
    loss=_grpo_loss, eval_metric=None, causal=False, chat=True,
    training_data=pipeline.rl_training_data, eval_batches=pipeline.rl_eval_batches,
    reference=True, reference_adapters=True, inner_iterations=lambda config: config.grpo.inner_iterations,
    driver=rl.GrpoDriver))


def block_size_at(config, step: jax.Array | None):
  """The block size a block-diffusion step trains with: `model.block_size`, or during `block.schedule` the
  stage's (an `attention.StagedSize` picked by the traced step). Validation (step None) uses the final one."""
  final, schedule = config.model.block_size, config.block.schedule
  if step is None or not schedule:
    return final
  ends = jnp.asarray([until for _, until in schedule], jnp.int32)
  return attention.StagedSize(config.block.sizes(final), jnp.sum(step >= ends).astype(jnp.int32))


def _block_loss(score_fn, batch, rng: jax.Array, *, config, reference=None, step=None) -> diffusion_lib.LossOutput:
  b, d = config.block, config.diffusion
  sft = "prompt_len" in batch
  return block_diffusion.block_diffusion_objective(
      score_fn, rng, tokens_BL=batch["tokens"], mask_id=d.mask_token_id, block_size=block_size_at(config, step),
      eps=d.noise_eps, t_min=b.t_min, t_max=b.t_max, weighting=b.weighting, complementary=b.complementary,
      valid_BL=batch.get("valid"), prompt_len_B=batch["prompt_len"] if sft else None,
      segment_BL=batch.get("segments"))


# Block diffusion (BD3LM / LLaDA2.0): packed text with its document ids (attention stays inside a document),
# x_t ++ x_0 under the four-part mask, the loss on the x_t half; model.block_size > 0.
BLOCK_DIFFUSION = register(Objective(
    name="block_diffusion", batch={"tokens": Field(_ROWS, "int32"), "segments": Field(_ROWS, "int32")},
    loss=_block_loss, eval_metric="eval_ppl_bound", causal=False, chat=False, blocks=True,
    training_data=functools.partial(pipeline.packed_training_data, segments=True),
    eval_batches=functools.partial(pipeline.packed_eval_batches, segments=True)))

# Its SFT: SFT batches (the prompt clean), rows rounded up to whole blocks by train.seq_len % block_size == 0
# (the EOS padding fills the last block, as LLaDA2.0 rounds lengths up to a block multiple).
BLOCK_SFT = register(Objective(
    name="block_sft", batch=SFT.batch, loss=_block_loss, eval_metric="eval_ppl_bound", causal=False, chat=True,
    blocks=True, training_data=pipeline.sft_training_data, eval_batches=pipeline.sft_eval_batches))
