"""The training step (pure, jitted, sharded) and the loop around it.

`train_step(state, batch) -> (state, metrics)` is a pure function: the state carries the run's key, and
the per-step key is `fold_in(state.rng, state.step)`, so a resumed run draws the same masks as an
uninterrupted one. The loop owns the side effects: data, checkpoints and metrics; run_control.py owns
the rest (the workdir lock, events.jsonl, SIGTERM, the non-finite watch, the end step), and the samples
shown after training are the CLI's (`print_samples`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llada_jax import checkpoint as ckpt_lib, files, run_control
from llada_jax import diffusion, lora as lora_lib, metrics as metrics_lib, model as model_lib, objectives, optim
from llada_jax import serving, sharding
from llada_jax.config import Config, architecture_fields, resolve_tokens, section_from_dict


_LORA_DROPOUT_STREAM = 0x10A  # fold_in constant: adapter dropout draws apart from the objective's masks


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 key data of the per-step key (raw, so Orbax stores it like any array)
  frozen: Any = None  # non-trained state: a reference model's parameters (objectives.Objective.reference)
  # LoRA (lora.rank > 0): the frozen base model's parameters, while `params` holds the adapters. Never
  # checkpointed: reloaded from train.init_from, whose fingerprint each checkpoint records.
  base: Any = flax.struct.field(default=None, metadata={"checkpoint": False})


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run: the jitted step and the shardings it was compiled for."""

  config: Config
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: TrainState       # ShapeDtypeStructs carrying the shardings of this mesh
  state_shardings: TrainState
  batch_shardings: dict[str, jax.sharding.NamedSharding]  # one per field of the objective's batch
  init: Callable[[jax.Array], TrainState]
  step: Callable[..., tuple[TrainState, dict]]  # (state, batch) -> (state, metrics)
  eval_step: Callable[..., dict]   # (params, batch, rng, frozen, base) -> {'loss', 'masked_accuracy', ...}
  objective: objectives.Objective
  jit_step: Any                    # the jitted (state, batch) -> (state, metrics) behind `step`
  with_reference: Callable[[TrainState], TrainState]  # frozen := a copy of params (reference objectives)
  # LoRA only (else None): rng -> a random base model placed like TrainState.base (benchmarks, tests); a
  # run loads its base from train.init_from instead (`load_base`).
  init_base: Callable[[jax.Array], Any] | None = None
  # LoRA only: (state, base, fresh) -> the state over that base; a `fresh` state (step 0, not restored) also
  # takes its trainable token rows from the base (lora.seed_tokens).
  attach_base: Callable[..., TrainState] | None = None


def _score_fn(config: Config, graphdef, params, adapters: lora_lib.Adapters | None = None) -> diffusion.ScoreFn:
  return model_lib.score_fn(config.model, graphdef, params, adapters)


def _loss(config: Config, graphdef, params, batch: dict, rng: jax.Array, frozen: Any = None,
          base: Any = None, *, training: bool = True, step: jax.Array | None = None
          ) -> tuple[jax.Array, diffusion.LossOutput]:
  """The objective's loss of `params`. With LoRA, `params` are the adapters over the frozen `base` (adapter
  dropout while `training`), and a reference model is the base itself (adapters off): no second copy.
  `step`: the training step (None in validation), for objectives that change over a run."""
  objective = objectives.of(config)
  if base is not None:
    dropout_rng = jax.random.fold_in(rng, _LORA_DROPOUT_STREAM) if training else None
    policy = _score_fn(config, graphdef, base, lora_lib.Adapters.of(params, config.lora, dropout_rng))
    # the base, or the base with the frozen adapters of an objective that keeps them (reference_adapters)
    frozen_adapters = None if frozen is None else lora_lib.Adapters.of(jax.lax.stop_gradient(frozen), config.lora)
    reference = _score_fn(config, graphdef, base, frozen_adapters) if objective.reference else None
  else:
    policy = _score_fn(config, graphdef, params)
    # The reference model scores with the policy's score function over its own (constant) parameters.
    reference = _score_fn(config, graphdef, jax.lax.stop_gradient(frozen)) if objective.reference else None
  out = objectives.compute_loss(objective, policy, batch, rng, config=config, reference=reference,
                                router_losses=training, step=step)
  return out.loss, out


def _metric_sums(loss: jax.Array, out: diffusion.LossOutput) -> dict[str, jax.Array]:
  # `loss` is the value that was differentiated (the one the non-finite check reads), not a copy of it.
  return {"loss": loss, "num_masked": out.num_masked, "num_correct": out.num_correct, **(out.metrics or {})}


def make_train_step(config: Config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable:
  """The pure step: one optimizer update on the batch, or, for an objective with inner iterations
  (`objectives.Objective.inner_iterations`, e.g. GRPO's mu), a `lax.scan` of that many updates, update i
  reading the batch's 'inner' fields at index i; metrics are their means (learning_rate: the last). With
  `grad_accum_steps` > 1 each update splits its batch into micro-batches that a `lax.scan` runs one after
  another, averaging gradients before the single optimizer update."""
  accum = config.train.grad_accum_steps
  objective = objectives.of(config)
  inner = objective.inner_iterations(config)
  inner_fields = [name for name, f in objective.batch.items() if f.inner]

  def update(params, opt_state, batch: dict, rng: jax.Array, frozen, base, count: jax.Array):
    grad_fn = jax.value_and_grad(lambda p, b, r: _loss(config, graphdef, p, b, r, frozen, base, step=count),
                                 has_aux=True)
    if accum == 1:
      (loss, out), grads = grad_fn(params, batch, rng)
      sums = _metric_sums(loss, out)
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

      def body(carry, xs):
        i, mb = xs
        (l, o), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
        acc_g, acc_m = carry
        return (jax.tree.map(jnp.add, acc_g, g), jax.tree.map(jnp.add, acc_m, _metric_sums(l, o))), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      first = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(lambda: _metric_sums(*_loss(config, graphdef, params, first, rng, frozen, base,
                                                          step=count)))
      zero_sums = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
      (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), (jnp.arange(accum), micro))
      grads = jax.tree.map(lambda g: g / accum, grads)
      # losses and objective metrics are means over micro-batches; the masked-token counts add up
      sums = {k: v if k in ("num_masked", "num_correct") else v / accum for k, v in sums.items()}
    loss, num_masked, num_correct = sums.pop("loss"), sums.pop("num_masked"), sums.pop("num_correct")
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # a NaN/Inf anywhere in the grads reaches the norm
    if config.train.skip_nonfinite:
      # A non-finite update leaves parameters and optimizer state as they were (the step counter and the
      # data still advance, so a resumed run stays in step with an uninterrupted one).
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      new_params, new_opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
    metrics = {
        "loss": loss,
        "masked_accuracy": num_correct / jnp.maximum(num_masked, 1),
        "grad_norm": grad_norm,
        "learning_rate": schedule(count),
        "nonfinite": (~finite).astype(jnp.float32),  # averaged over a log window: the share skipped
        **sums,  # the objective's own metrics (preference accuracy, reward margin, ...)
    }
    return new_params, new_opt_state, metrics

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if not inner_fields:
      params, opt_state, metrics = update(state.params, state.opt_state, batch, step_rng, state.frozen,
                                          state.base, state.step)
    else:
      def body(carry, i):
        p, o = carry
        b = {k: v[:, i] if k in inner_fields else v for k, v in batch.items()}
        p, o, m = update(p, o, b, jax.random.fold_in(step_rng, i), state.frozen, state.base, state.step * inner + i)
        return (p, o), m

      (params, opt_state), per_update = jax.lax.scan(body, (state.params, state.opt_state), jnp.arange(inner))
      metrics = {k: v[-1] if k == "learning_rate" else v.mean(axis=0) for k, v in per_update.items()}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(config: Config, graphdef: nnx.GraphDef) -> Callable:
  """Validation: the training objective on held-out batches, without the random-length crop, with the
  masks drawn from a key the caller fixes (so numbers are comparable across steps). For the diffusion
  objectives the loss is an upper bound on the NLL per token (exp(loss) bounds the perplexity); for
  the causal baseline it is the exact NLL per token."""
  eval_config = dataclasses.replace(
      config, diffusion=dataclasses.replace(config.diffusion, random_length_prob=0.0))

  def eval_step(params: Any, batch: dict, rng: jax.Array, frozen: Any = None, base: Any = None) -> dict:
    loss, out = _loss(eval_config, graphdef, params, batch, rng, frozen, base, training=False)
    return {"loss": loss, "masked_accuracy": out.num_correct / jnp.maximum(out.num_masked, 1),
            **(out.metrics or {})}

  return eval_step


def setup(config: Config, mesh: jax.sharding.Mesh | None = None) -> Setup:
  """Builds the mesh, abstract state, shardings and the jitted init and step functions."""
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  divisor = sharding.batch_divisor(config.mesh, mesh)
  micro = config.train.batch_size // config.train.grad_accum_steps
  if micro % divisor:
    raise ValueError(f"config field 'train.batch_size'={config.train.batch_size} (micro-batch {micro}) must "
                     f"be a multiple of the {divisor} devices the batch is split over")
  graphdef, abstract_model_state = model_lib.abstract_model(config.model)
  model_shardings = sharding.tree_shardings(sharding.param_logical_axes(abstract_model_state), config.mesh, mesh)
  lora = config.lora
  if lora.enabled:
    # The adapters train; the model's own parameters are the frozen base (TrainState.base).
    abstract_params = lora_lib.abstract(config.model, lora)
    param_shardings = sharding.tree_shardings(lora_lib.logical_axes(config.model, lora), config.mesh, mesh)
    base_dtype = jnp.dtype(lora.base_dtype or config.model.param_dtype)
    abstract_base = ckpt_lib.abstract_like(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, base_dtype),
                                                        nnx.to_pure_dict(abstract_model_state)), model_shardings)
  else:
    abstract_params, param_shardings, abstract_base = nnx.to_pure_dict(abstract_model_state), model_shardings, None
  base_sh = model_shardings if lora.enabled else None
  objective = objectives.of(config)
  # optimizer updates: an objective with inner iterations makes several per step
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps * objective.inner_iterations(config))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  repl = sharding.replicated(mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings, transform_non_params=lambda _: repl,
      is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  # A reference model is sharded exactly like the parameters it copies; under LoRA it is the base itself,
  # or (`reference_adapters`) the base with a frozen copy of the adapters.
  copies_reference = objective.reference and (not lora.enabled or objective.reference_adapters)
  frozen_sh = param_shardings if copies_reference else None
  init_shardings = TrainState(step=repl, params=param_shardings, opt_state=opt_shardings, rng=repl,
                              frozen=frozen_sh)
  state_shardings = init_shardings.replace(base=base_sh)

  def init_fn(rng: jax.Array) -> TrainState:
    params_key, step_key = jax.random.split(rng)
    params = (lora_lib.init(config.model, lora, params_key) if lora.enabled
              else model_lib.init_params(config.model, params_key))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(step_key),
                      frozen=jax.tree.map(jnp.copy, params) if copies_reference else None)

  abstract_state = ckpt_lib.abstract_like(jax.eval_shape(init_fn, jax.random.key(0)), init_shardings)
  abstract_state = abstract_state.replace(base=abstract_base)

  batch_sh = {name: sharding.batch_sharding(config.mesh, mesh, ndim)
              for name, ndim in objective.batch_ranks().items()}
  with sharding.use_rules(config.mesh, mesh):
    init = jax.jit(init_fn, out_shardings=init_shardings)
    jit_step = jax.jit(make_train_step(config, graphdef, tx, schedule),
                       in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, repl),
                       donate_argnums=0)
    eval_step = jax.jit(make_eval_step(config, graphdef),
                        in_shardings=(param_shardings, batch_sh, repl, frozen_sh, base_sh), out_shardings=repl)
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_shardings)
    init_base = attach_base = None
    if lora.enabled:
      init_base = jax.jit(lambda rng: jax.tree.map(lambda x: x.astype(base_dtype),
                                                   model_lib.init_params(config.model, rng)),
                          out_shardings=model_shardings)
      seed = jax.jit(lambda p, b: lora_lib.seed_tokens(p, b, lora), out_shardings=param_shardings)

      def attach_base(state: TrainState, base: Any, fresh: bool) -> TrainState:
        state = state.replace(base=base)
        return state.replace(params=seed(state.params, base)) if fresh and lora.token_ids else state

  def with_reference(state: TrainState) -> TrainState:
    return state.replace(frozen=copy(state.params)) if copies_reference else state

  return Setup(config, mesh, graphdef, tx, schedule, abstract_state, state_shardings, batch_sh, init, jit_step,
               eval_step, objective, jit_step, with_reference, init_base, attach_base)


class SupervisedDriver:
  """How the loop runs an objective without a driver of its own (`objectives.Objective.driver`): each data
  batch, sharded, goes to the jitted step; validation is `validate` on the held-out batches."""

  def __init__(self, s: Setup, data: Any = None):
    del data
    self.s = s

  def __call__(self, state: TrainState, host_batch: dict[str, np.ndarray]) -> tuple[TrainState, dict]:
    return self.s.step(state, global_batch(self.s, host_batch))

  def validate(self, state: TrainState, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    return validate(self.s, state.params, batches, reference=state.frozen, base=state.base)


def driver(s: Setup, data: Any) -> Any:
  """The loop's step for `s`'s objective: its own driver (e.g. GRPO's rollouts), else `SupervisedDriver`."""
  return (s.objective.driver or SupervisedDriver)(s, data)


def batch_fields(config: Config) -> dict[str, int]:
  """Fields of a training batch and their ranks (`objectives.Objective.batch`)."""
  return objectives.of(config).batch_ranks()


def root_key(config: Config) -> jax.Array:
  """The run's one root key (`Setup.init` splits it into parameter-init and per-step keys)."""
  return jax.random.key(config.train.seed)


def global_batch(s: Setup, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Host-local numpy rows -> one global array per field, sharded over the batch axes."""
  s.objective.check_batch(host_batch)
  return {k: jax.make_array_from_process_local_data(s.batch_shardings[k], v) for k, v in host_batch.items()}


def run_steps(s: Setup, state: TrainState, batches, num_steps: int) -> tuple[TrainState, list]:
  """Runs `num_steps` steps without logging (tests, benchmarks); returns the state and host metrics."""
  history = []
  with sharding.use_rules(s.config.mesh, s.mesh):
    for _ in range(num_steps):
      state, m = s.step(state, global_batch(s, next(batches)))
      history.append(m)
  return state, jax.device_get(history)


def validate(s: Setup, params: Any, batches: list[dict[str, np.ndarray]], *,
             reference: Any = None, base: Any = None) -> dict[str, float]:
  """Mean held-out loss, masked accuracy and the objective's metrics over `batches` (`eval_` + name),
  batch i masked with a key fixed by i. `reference`: the frozen reference parameters (`TrainState.frozen`)
  of an objective that has one; `base`: a LoRA run's base parameters (`TrainState.base`), `params` being
  its adapters."""
  if s.config.lora.enabled and base is None:
    raise ValueError("validating a LoRA run needs its base parameters (TrainState.base)")
  if s.objective.reference and not s.config.lora.enabled and reference is None:
    raise ValueError(f"validating a '{s.objective.name}' run needs its reference parameters (TrainState.frozen)")
  key = jax.random.key(s.config.train.seed + 1)
  with sharding.use_rules(s.config.mesh, s.mesh):
    out = [s.eval_step(params, global_batch(s, b), jax.random.fold_in(key, i), reference, base)
           for i, b in enumerate(batches)]
  out = jax.device_get(out)
  means = {f"eval_{k}": float(np.mean([o[k] for o in out])) for k in out[0]}
  if s.objective.eval_metric:
    means[s.objective.eval_metric] = float(np.exp(min(means["eval_loss"], 50.0)))
  return means


def _check_tokenizer(config: Config, tok) -> None:
  if tok.vocab_size > config.model.vocab_size:
    raise ValueError(f"config field 'model.vocab_size'={config.model.vocab_size} is smaller than the "
                     f"tokenizer's {tok.vocab_size} pieces")
  if tok.mask_id != config.diffusion.mask_token_id:
    raise ValueError(f"config field 'diffusion.mask_token_id'={config.diffusion.mask_token_id} does not "
                     f"match the tokenizer's mask id {tok.mask_id}")


def _check_resume_config(config: Config, saved: dict, where: str) -> None:
  """The model fields that define the parameters (config.architecture_fields) must match the checkpoint's;
  execution and usage fields (config field metadata) may differ."""
  compared = set(architecture_fields())
  for section in ("model",):
    for key, value in saved.get(section, {}).items():
      now = getattr(getattr(config, section), key)
      if key not in compared:
        continue
      if (list(now) if isinstance(now, tuple) else now) != value:
        raise ValueError(f"config field '{section}.{key}'={now!r} differs from {value!r} in the checkpoint "
                         f"at {where}; use a new --workdir or the checkpoint's value")


def _check_resume_adapters(config: Config, saved: dict, where: str) -> None:
  """Resuming a run: the LoRA fields that shape its trained tree (rank, targets, token rows) must match."""
  before = section_from_dict("lora", saved.get("lora", {}))
  for key in ("rank", "targets", "trainable_tokens"):
    now, then = getattr(config.lora, key), getattr(before, key)
    if now != then:
      raise ValueError(f"config field 'lora.{key}'={now!r} differs from {then!r} in the checkpoint at {where} "
                       "(the trained adapters have that shape); use a new --workdir or the checkpoint's value")


def _init_params_from(config: Config, s: Setup, state: TrainState) -> TrainState:
  """Fine-tuning start: the latest parameters of `train.init_from`, a fresh optimizer and step 0."""
  source = ckpt_lib.Checkpointer(config.train.init_from, read_only=True)
  step = source.latest_step()
  if step is None:
    raise FileNotFoundError(f"config field 'train.init_from': no checkpoint in {source.directory}; train that "
                            "run first, or point at a workdir whose checkpoints/ holds a step")
  _check_resume_config(config, source.restore_config(step), source.directory)
  params = source.restore_params(step, s.abstract_state.params)
  source.close()
  print(f"initialised parameters from step {step} of {source.directory}", flush=True)
  return state.replace(params=params)


def load_base(config: Config, s: Setup, expected: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
  """A LoRA run's frozen base: the parameters of `train.init_from` (its latest step, or on resume the
  `expected` record's step, whose fingerprint must match) in lora.base_dtype, and the record the run's
  checkpoints keep of them (`checkpoint.restore_base`)."""
  return ckpt_lib.restore_base(config.train.init_from, s.abstract_state.base, expected=expected,
                               label="config field 'train.init_from'",
                               check_config=lambda saved, where: _check_resume_config(config, saved, where))


def inference_params(config: Config, state: TrainState) -> Any:
  """The parameters the model runs with after training: `state.params`, or for LoRA the base with the
  adapters merged in."""
  return lora_lib.merge(state.base, state.params, config.lora) if config.lora.enabled else state.params


def train_and_evaluate(config: Config, workdir: str, *, stop_at: int | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest good checkpoint); returns a summary.

  `stop_at` ends the run early, with a checkpoint, after that step (for a time-limited allocation); the
  schedule still follows `train.num_steps`, so a later call resumes exactly where this one stopped. A
  SIGTERM does the same at the next step boundary. The run holds the workdir alone and records what it
  does in WORKDIR/events.jsonl (run_control.RunControl). The summary: final step, last logged metrics,
  wall time, whether the run was preempted, whether it `finished` (reached `train.num_steps`), the final
  state, and what `print_samples` needs (the setup, the tokenizer and the data's `sample_prompts`), which
  `llada-train` calls after a finished run.
  """
  with run_control.RunControl(workdir, config.train, stop_at=stop_at) as control:
    return _train(config, workdir, control)


def _train(config: Config, workdir: str, control: run_control.RunControl) -> dict[str, Any]:
  t_start = time.time()
  data = objectives.training_data(config, workdir)
  tok = data.tokenizer
  _check_tokenizer(config, tok)
  config = resolve_tokens(config, tok)  # lora.trainable_tokens pieces -> ids (the saved config keeps ids)
  if jax.process_index() == 0:
    print(data.description, flush=True)
    if data.unigram_entropy is not None:
      print(f"corpus unigram entropy {data.unigram_entropy:.3f} nats/token (the loss to beat)", flush=True)
  s = setup(config)
  data_iter = data.iterator
  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.train.max_to_keep,
                               keep_every=config.train.keep_every,
                               async_save=config.train.async_checkpointing)
  control.attach(ckpt)
  restored = ckpt.restore_latest_good(
      s.abstract_state, data_iterator=data_iter,
      check_config=lambda saved: (_check_resume_config(config, saved, ckpt.directory),
                                  _check_resume_adapters(config, saved, ckpt.directory)),
      log=lambda line: print(line, file=sys.stderr, flush=True))
  if restored is not None:
    start, state = restored
    print(f"resumed from step {start} in {ckpt.directory}", flush=True)
  else:
    start = 0
    state = s.init(root_key(config))
    if config.train.init_from and not config.lora.enabled:
      state = s.with_reference(_init_params_from(config, s, state))
  base_record = None
  if config.lora.enabled:  # the adapters start fresh (or were restored); the base is read every time
    base, base_record = load_base(config, s, ckpt.base_record(start) if restored is not None else None)
    state = s.attach_base(state, base, fresh=restored is None)
    if restored is None:
      state = s.with_reference(state)  # (reference_adapters) the adapters as they start, token rows seeded
      print(f"LoRA rank {config.lora.rank} on {', '.join(config.lora.targets)} over the frozen step "
            f"{base_record['step']} of {config.train.init_from}", flush=True)
  control.begin(start, resumed=restored is not None)
  if jax.process_index() == 0:
    files.write_atomic(files.path(workdir, "config.json"), config.to_json())

  writer = metrics_lib.MetricsWriter(workdir)
  tokens_per_step = config.train.batch_size * config.train.seq_len
  peak = metrics_lib.peak_flops_per_device()
  logger = metrics_lib.WindowLogger(
      writer, metrics_lib.Progress(config.train.num_steps, start), tokens_per_step=tokens_per_step,
      flops_per_step=metrics_lib.train_flops_per_token(config.model, config.train.seq_len) * tokens_per_step,
      peak_flops=peak * s.mesh.size if peak else None)
  eval_batches = objectives.eval_batches(config, tok) if config.train.eval_every else []
  run_step = driver(s, data)
  preempted = False
  watch = run_control.NonfiniteWatch(config.train, ckpt)
  with sharding.use_rules(config.mesh, s.mesh):
    for step in range(start, control.end):
      state, m = run_step(state, next(data_iter))
      done = step + 1
      control.step_done(done)  # records saves completed meanwhile (never waits)
      watch.add(done, m["nonfinite"])  # checks the previous step's flag: the device stays busy
      preempted = control.stop_requested(done)
      last_step = done == control.end or preempted
      logger.add(done, m, log_now=done % config.train.log_every == 0 or last_step)
      if eval_batches and (done % config.train.eval_every == 0 or done == config.train.num_steps):
        scores = run_step.validate(state, eval_batches)
        writer.write(done, scores)
        logger.progress.print(done, scores)
      if (done % config.train.checkpoint_every == 0 or last_step) and watch.state_is_good(done):
        if ckpt.save(done, state, data_iterator=data_iter, config=config.to_dict(), force=preempted,
                     base=base_record):
          control.saving(done)
      if preempted:
        if jax.process_index() == 0:
          print(f"stop requested (SIGTERM): saved step {done}; rerun the same command to resume", flush=True)
        break
    last = logger.flush()
    ckpt.wait()  # still under the handler: a late SIGTERM cannot cut the last save short
  control.finish(preempted)
  ckpt.close()
  writer.close()
  return {"step": int(state.step), "metrics": last, "wall_time_s": time.time() - t_start,
          "preempted": preempted, "finished": int(state.step) == config.train.num_steps, "state": state,
          "setup": s, "tokenizer": tok, "sample_prompts": data.sample_prompts}


def print_samples(config: Config, summary: dict[str, Any]) -> list[tuple[str, str]]:
  """Completes the data's sample prompts with a run's final parameters (`summary` as returned by
  `train_and_evaluate`) and prints `sample: 'prompt' -> 'completion'` lines (process 0); returns the
  (prompt, completion) pairs. What `llada-train` shows after a finished run."""
  config = resolve_tokens(config, summary["tokenizer"])  # as the run did: lora.trainable_tokens as ids
  results = sample_completions(config, summary["setup"], inference_params(config, summary["state"]),
                               summary["tokenizer"], summary["sample_prompts"])
  if jax.process_index() == 0:
    for shown, completion in results:
      print(f"sample: {shown!r} -> {completion!r}", flush=True)
  return results


def sample_completions(config: Config, s: Setup, params: Any, tok,
                       prompts: list[tuple[str, list[int]]]) -> list[tuple[str, str]]:
  """Completes (shown text, token ids) prompts with the reverse process (the causal baseline left to
  right: serving dispatches on model.causal), `train.sample_length` tokens in `train.sample_steps`; a
  block-diffusion model decodes its own blocks, one token per step (`sampling.generate_blocks`)."""
  if not prompts:
    return []
  loaded = serving.LoadedModel.from_params(config.model, s.graphdef,
                                           jax.device_put(params, sharding.replicated(s.mesh)), tok,
                                           mask_id=config.diffusion.mask_token_id, step=config.train.num_steps)
  t = config.train
  options = dict(gen_length=t.sample_length)
  if not config.model.block_size:
    options.update(steps=t.sample_steps, block_length=t.sample_length)
  completions = loaded.complete([shown for shown, _ in prompts], prompt_ids=[ids for _, ids in prompts], **options)
  return [(c.prompt, c.text) for c in completions]
