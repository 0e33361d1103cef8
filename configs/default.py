"""All llada_jax config fields with their defaults, and the named presets.

Use as `--config=configs/default.py:VARIANT` with VARIANT in tiny, demo, llada_1b, llada_8b, illada_8b,
moe_tiny, llada_moe_7b_a1b (model shapes for pre-training), or through the files beside it (`configs/demo.py`, `configs/sft_demo.py`,
`configs/pretrain_text.py`, ...). `sft(c)` turns a preset into its SFT counterpart, `preference(c)` into
its VRPO / exact-DPO one, `grpo(c)` its diffu-GRPO one, `lora(c, ...)` trains adapters instead of every parameter. Override any field on the command line:
`--config.train.num_steps=200`. Validation (ranges, cross-field checks) lives in llada_jax/config.py.
"""

import ml_collections

VARIANTS = ("tiny", "demo", "llada_1b", "llada_8b", "illada_8b", "moe_tiny", "llada_moe_7b_a1b")


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 1024        # rows of the embedding / columns of the output head (>= tokenizer size)
  m.d_model = 128            # residual width
  m.num_layers = 2           # Transformer blocks
  m.num_heads = 4            # query heads; head_dim = d_model // num_heads
  m.num_kv_heads = 4         # key/value heads (grouped-query attention when < num_heads)
  m.mlp_dim = 256            # SwiGLU hidden width (with num_experts > 0: each expert's)
  m.max_seq_len = 4096       # longest sequence the config accepts
  m.rope_theta = 500000.0    # RoPE base (LLaDA: 500000)
  m.norm_eps = 1e-5          # RMSNorm epsilon
  m.init_std = 0.02          # std of the normal initialiser of every matrix
  m.causal = False           # True: autoregressive baseline (causal mask); needs diffusion.objective='ar'
  m.tie_embeddings = False   # the output head is the embedding matrix (iLLaDA); no head parameter
  m.qk_norm = False          # RMSNorm over head_dim on queries and keys before RoPE (LLaDA-MoE)
  m.rope_fraction = 1.0      # share of each head's dims RoPE rotates (HF partial_rotary_factor)
  m.num_experts = 0          # >0: mixture-of-experts FFN of this many SwiGLU experts of width mlp_dim
  m.experts_per_token = 2    # MoE: experts each token is routed to (top-k)
  m.shared_expert_dim = 0    # MoE: >0 adds a dense SwiGLU of this width that every token goes through
  m.router_score = "softmax"  # MoE: router scores, softmax | sigmoid (float32)
  m.router_renorm = False    # MoE: renormalise the k chosen scores to sum to 1
  m.router_bias = False      # MoE: a per-expert bias added to the scores to choose experts (not to weigh)
  m.routed_scaling = 1.0     # MoE: the chosen weights are multiplied by this
  m.capacity_factor = 0.0    # MoE: >0 caps each expert at factor * tokens * k / experts (the rest
                             # dropped); 0: dropless
  m.moe_aux_loss_weight = 0.01  # MoE: weight of the load-balancing loss added to every objective
  m.moe_z_loss_weight = 0.001   # MoE: weight of the router z-loss
  m.block_size = 0           # >0: block-causal attention over blocks of this many tokens (block diffusion,
                             # REFERENCE §14; the block_* objectives); 0: bidirectional. Shapes no parameter
  m.chat = ml_collections.config_dict.placeholder(bool)  # the model answers chat-templated prompts;
                             # None: what the objective trains (True for sft); stored in checkpoints
  m.scan_layers = True       # lax.scan over stacked layers (fast compiles) vs an unrolled Python loop
  m.remat_policy = "none"    # per-layer rematerialisation: none | full | dots | dots_no_batch | attn_out
                             # (keep attention outputs) | qkv_attn_out (also q, k, v)
  m.attention_impl = "xla"   # xla (everywhere) | cudnn (NVIDIA flash attention) | splash (TPU Pallas)
                             # | auto (the best this backend has)
  m.loss_chunk_size = 0      # >0: output head + cross-entropy in sequence chunks of this many tokens,
                             # so the [B, L, vocab] float32 logits never exist at once (training)
  m.mlp_pad_to = 0           # >0: run the SwiGLU with its hidden width zero-padded up to a multiple of
                             # this (exact; GPU GEMMs slow down on widths like 5634); params unchanged
  m.dtype = "bfloat16"       # compute dtype (softmax, norms, RoPE and losses always run in float32)
  m.param_dtype = "float32"  # parameter and optimizer-state dtype

  c.diffusion = d = ml_collections.ConfigDict()
  d.objective = "pretrain"   # pretrain (masked diffusion) | sft (prompt never masked) | ar (next token)
                             # | vrpo (preferences on ELBOs) | ar_dpo (exact DPO, causal baseline)
                             # | grpo (RL with verifiable rewards, diffu-GRPO) | block_diffusion (block
                             # diffusion on packed text, needs model.block_size) | block_sft (its SFT)
  d.mask_token_id = 4        # id of the mask token M; 4 for the built-in sentencepiece tokenizer
  d.noise_eps = 1e-3         # masking probability p = (1 - eps) * t + eps, t ~ U(0, 1)
  d.random_length_prob = 0.01  # fraction of batches cropped to a random length (REFERENCE §2)

  c.preference = pr = ml_collections.ConfigDict()  # vrpo / ar_dpo only (REFERENCE §9)
  pr.beta = 0.1              # DPO's beta on the (ELBO) log-ratio margin; LLaDA2.0's DPO used 0.1
  pr.budget = 8              # Monte Carlo samples per ELBO estimate (VRPO's n)
  pr.n_mask = 1              # masks per sampled timestep: budget = (budget / n_mask) timesteps x n_mask;
                             # 1 is VRPO's optimal allocation
  pr.antithetic = True       # policy and reference share the timesteps and masks of each estimate
  pr.estimator = "t"         # t: p ~ U(eps, 1), each token masked w.p. p, weight 1/p (REFERENCE §2, §9);
                             # l: exactly l of L tokens masked, weight L/l (§5, lower variance)

  c.grpo = g = ml_collections.ConfigDict()  # diffu-GRPO (REFERENCE §10); defaults: d1's GSM8K run
  g.num_generations = 6      # G: completions sampled per prompt (train.batch_size counts completions)
  g.inner_iterations = 12    # mu: optimizer updates per batch of rollouts (d1: 12 GSM8K/MATH, 8 countdown)
  g.clip_eps = 0.5           # ratio clipping: min(r A, clip(r, 1 - eps, 1 + eps) A)
  g.beta = 0.04              # weight of the k3 KL to the reference (0: no reference pass at all)
  g.p_mask_prompt = 0.15     # one-pass estimator: each prompt token masked with this probability
  g.scale_rewards = False    # divide advantages by the group's reward std (GRPO); d1 does not
  g.ref_sync_every = 64      # reference := policy every this many steps (0: keep the starting model)
  g.rewards = ("correct", "format")  # reward functions, summed: names in llada_jax.rewards or
                             # 'package.module:function' of your own fn(prompt, completion, example) -> float
  g.gen_length = 256         # rollouts: tokens generated per completion (train.seq_len = prompt + this)
  g.steps = 128              # rollouts: reverse-process steps
  g.block_length = 32        # rollouts: semi-autoregressive block length
  g.temperature = 0.9        # rollouts: sampling temperature (held-out evaluation is greedy)
  g.cfg_scale = 0.0          # rollouts: classifier-free guidance
  g.remasking = "low_confidence"  # rollouts: low_confidence | random | margin | entropy
  g.threshold = ml_collections.config_dict.placeholder(float)  # rollouts: Fast-dLLM parallel decoding
  g.suppress_eos_logit = False     # rollouts: never predict EOS
  g.suppress_eos_confidence = False  # rollouts: commit EOS / end of turn last
  g.early_exit = False       # rollouts: stop a row once only EOS can follow
  g.kv_cache = "none"        # rollouts: none | prefix | dual (Fast-dLLM's approximate cache)

  c.block = b = ml_collections.ConfigDict()  # block_diffusion / block_sft only (REFERENCE §14)
  b.t_min = 0.0              # t ~ U(t_min, t_max), one per sequence (LLaDA2.0 SFT clips t; dFactory 0.3-0.8)
  b.t_max = 1.0              # upper end of that band
  b.weighting = "inverse_t"  # inverse_t: masked CE / p (the bound) | mean: CE averaged over masked tokens
  b.complementary = False    # every row also trains under its mask's complement (twice the rows)
  b.schedule = ()            # ((size, until_step), ...): block size `size` below until_step, then
                             # model.block_size; e.g. ((1, 1000), (4, 2000)) for 1 -> 4 -> 32

  c.lora = lo = ml_collections.ConfigDict()  # LoRA fine-tuning (REFERENCE §11); any objective
  lo.rank = 0                # adapter rank; 0: off (every parameter trains). >0 freezes train.init_from's
                             # parameters (the base) and trains only the adapters
  lo.alpha = 32.0            # the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
  lo.dropout = 0.0           # dropout on an adapter's input while training
  lo.targets = ("q_proj", "k_proj", "v_proj", "ff_up")  # projections that get adapters, from q_proj k_proj
                             # v_proj attn_out ff_gate ff_up ff_down (d1's four that LLaDA has)
  lo.rslora = False          # rank-stabilised scaling alpha / sqrt(rank)
  lo.base_dtype = ""         # dtype of the frozen base weights ("" = model.param_dtype; "bfloat16" halves them)
  lo.trainable_tokens = ()   # tokens whose embedding row and output-head column also train (PEFT's
                             # trainable_token_indices): ids or tokenizer pieces, e.g. ("<|eot_id|>",)

  c.optim = o = ml_collections.ConfigDict()
  o.peak_lr = 4e-4           # learning rate after warmup
  o.warmup_steps = 100       # linear warmup 0 -> peak_lr
  o.stage2_steps = 0         # steps at peak_lr * stage2_lr_ratio after the stable phase
  o.stage2_lr_ratio = 0.25   # LLaDA: 4e-4 -> 1e-4
  o.decay_steps = 0          # final linear decay to peak_lr * final_lr_ratio
  o.final_lr_ratio = 0.025   # LLaDA: 1e-5 / 4e-4
  o.weight_decay = 0.1       # AdamW decoupled weight decay
  o.no_decay_patterns = ("norm", "embedding")  # params whose path contains one of these skip decay
  o.b1 = 0.9                 # Adam beta1
  o.b2 = 0.95                # Adam beta2
  o.adam_eps = 1e-8          # Adam epsilon
  o.grad_clip_norm = 1.0     # global-norm clipping threshold; 0 disables clipping
  o.mu_dtype = ""            # Adam first-moment dtype ("" = parameter dtype; "bfloat16" halves it)

  c.data = da = ml_collections.ConfigDict()
  da.source = "procedural"   # procedural | text | jsonl | array_record | tfds (SFT: procedural | jsonl |
                             # task; GRPO: task | jsonl): `task` is the built-in verifiable task
  da.paths = ()              # files or globs for text / jsonl / array_record sources
  da.eval_paths = ()         # held-out files for validation (train.eval_every); same format as paths
  da.text_field = "text"     # JSONL field holding a pre-training document
  da.text_unit = "line"      # text files: one document per line, or per file
  da.tfds_name = ""          # TFDS dataset name (prepared beforehand in array_record format)
  da.tfds_split = "train"    # TFDS split, e.g. "train" or "train[:90%]"
  da.tfds_eval_split = ""    # held-out TFDS split for validation, e.g. "validation" or "train[90%:]"
  da.tfds_data_dir = ""      # TFDS data_dir ("" = TFDS default)
  da.on_bad_record = "error"  # a bad text/JSONL line (not UTF-8/JSON): error naming file:line, or skip + count
  da.sft_format = "messages"  # SFT JSONL: {"messages": [...]} conversations, or prompt/response pairs
  da.prompt_field = "prompt"  # SFT pairs: prompt field
  da.response_field = "response"  # SFT pairs: response field
  da.chosen_field = "chosen"  # preference JSONL: the preferred response
  da.rejected_field = "rejected"  # preference JSONL: the dispreferred response
  da.num_documents = 20000   # documents (or conversations, for SFT) generated for the built-in data
  da.corpus_seed = 0         # seed of the built-in corpus generator
  da.tokenizer_path = ""     # sentencepiece .model, or a Hugging Face tokenizer.json / folder holding one;
                             # "" trains a sentencepiece model in the workdir on the data
  da.tokenizer_vocab_size = 1024  # vocabulary of a tokenizer trained here
  da.tokenizer_model_type = "bpe"  # bpe | unigram, for a tokenizer trained here
  da.tokenizer_train_docs = 200000  # at most this many documents feed tokenizer training
  da.shuffle_seed = 0        # seed of the grain shuffle
  da.mp_prefetch_workers = 0  # grain worker processes for tokenization/packing (0: in the main process)

  c.mesh = me = ml_collections.ConfigDict()
  me.data = 1                # data-parallel axis size (-1: the rest of the devices)
  me.fsdp = -1               # fully-sharded data-parallel axis size
  me.expert = 1              # expert-parallel axis size (> 1 needs rule_set fsdp_ep)
  me.tensor = 1              # tensor-parallel axis size (> 1 needs rule_set fsdp_tp)
  me.rule_set = "fsdp"       # dp | fsdp | fsdp_tp | fsdp_ep: logical -> mesh axis table (llada_jax.sharding)
  me.rules = ()              # overrides of single entries: (("vocab", None), ...)

  c.train = t = ml_collections.ConfigDict()
  t.seed = 0                 # root PRNG seed (params, masks: fold_in(key, step))
  t.init_from = ""           # SFT: workdir of a pre-trained run; its params (not optimizer) start training
  t.batch_size = 8           # global batch, in sequences
  t.seq_len = 128            # tokens per sequence
  t.num_steps = 1000         # optimizer steps
  t.grad_accum_steps = 1     # micro-batches per step (batch_size must divide evenly)
  t.log_every = 10           # steps between metric lines
  t.checkpoint_every = 500   # steps between checkpoints (and one at the end)
  t.max_to_keep = 3          # checkpoints kept on disk
  t.keep_every = 0           # also keep every checkpoint whose step is a multiple of this (0: none)
  t.async_checkpointing = True  # write checkpoints in the background
  t.skip_nonfinite = True    # a step with a NaN/Inf loss or gradients leaves params and optimizer as they were
  t.max_nonfinite_streak = 10  # halt after this many non-finite steps in a row (naming the last checkpoint)
  t.num_samples = 4          # completions printed at the end of training (0: none)
  t.eval_every = 0           # steps between validations on held-out data (0: none); procedural data
                             # holds out fresh documents about the same world
  t.eval_batches = 4         # held-out batches per validation (the same batches and masks every time)
  t.sample_steps = 32        # reverse-process steps for those samples
  t.sample_length = 32       # tokens generated per sample
  return c


def sft(c: ml_collections.ConfigDict, init_from: str = "") -> ml_collections.ConfigDict:
  """The SFT counterpart of a pre-training preset (REFERENCE §6): same model, the SFT loss, a fresh
  optimizer, warmup over 50 steps, then constant, then linear decay to 10% over the last 10% of steps.
  The paper fine-tunes at 2.5e-5 with batch 256; small presets use larger rates for short runs."""
  c.diffusion.objective = "sft"
  c.train.init_from = init_from
  c.optim.update(warmup_steps=min(50, c.train.num_steps // 10), stage2_steps=0,
                 decay_steps=max(1, c.train.num_steps // 10), final_lr_ratio=0.1)
  return c


def preference(c: ml_collections.ConfigDict, init_from: str = "", objective: str = "vrpo") -> ml_collections.ConfigDict:
  """The preference-optimisation counterpart of a preset (REFERENCE §9): VRPO on ELBOs (or `ar_dpo`, exact
  DPO of the causal baseline), the reference = the starting model (`init_from`, an SFT run), a fresh
  optimizer at a small constant rate after a 10% warmup, no weight decay (DPO's usual recipe; the paper
  gives no VRPO rate), held-out preferences validated (the built-in set holds out unseen entities)."""
  c.diffusion.objective = objective
  c.model.causal = objective == "ar_dpo"
  c.train.init_from = init_from
  c.optim.update(warmup_steps=max(1, c.train.num_steps // 10), stage2_steps=0, decay_steps=0, weight_decay=0.0)
  return c


def grpo(c: ml_collections.ConfigDict, init_from: str = "") -> ml_collections.ConfigDict:
  """The RL counterpart of a preset (REFERENCE §10): diffu-GRPO from `init_from` (an SFT run) on the
  built-in verifiable task (data.source='task'; 'jsonl' for prompt files with an `answer` field), d1's
  optimizer (AdamW 0.9/0.99, weight decay 0.1, clipping 0.2, a constant rate: d1's warmup is 0.01% of
  its steps, under one update) and
  held-out greedy accuracy as validation."""
  c.diffusion.objective = "grpo"
  c.train.init_from = init_from
  c.data.source = "task"
  c.optim.update(b1=0.9, b2=0.99, weight_decay=0.1, grad_clip_norm=0.2, stage2_steps=0, decay_steps=0,
                 warmup_steps=0)
  return c


def block(c: ml_collections.ConfigDict, block_size: int = 32, init_from: str = "",
          sft: bool = False) -> ml_collections.ConfigDict:
  """The block-diffusion counterpart of a preset (REFERENCE §14): the same model made block-causal over
  `block_size` tokens, continued from `init_from` (e.g. a pure-diffusion run: the parameters are the
  same) with a fresh optimizer, on packed text, or (`sft`) on the preset's SFT data with the prompt clean.
  Samples come from `sampling.generate_blocks`."""
  c.model.block_size = block_size
  c.diffusion.objective = "block_sft" if sft else "block_diffusion"
  c.train.init_from = init_from
  if init_from:
    c.optim.update(warmup_steps=min(50, c.train.num_steps // 10), stage2_steps=0,
                   decay_steps=max(1, c.train.num_steps // 10), final_lr_ratio=0.1)
  return c


def lora(c: ml_collections.ConfigDict, rank: int, alpha: float, peak_lr: float,
         targets: tuple[str, ...] | None = None,
         trainable_tokens: tuple[int | str, ...] = ()) -> ml_collections.ConfigDict:
  """LoRA on top of a fine-tuning config (REFERENCE §11): the base (`train.init_from`) frozen, adapters of
  `rank` on `targets` (None: keep c.lora.targets) and the embedding/head rows of `trainable_tokens`
  trained at `peak_lr` (adapters train at larger rates than full fine-tuning)."""
  c.lora.update(rank=rank, alpha=alpha, targets=c.lora.targets if targets is None else targets,
                trainable_tokens=trainable_tokens)
  c.optim.peak_lr = peak_lr
  return c


def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"config variant must be one of {VARIANTS}; got {variant!r}")
  c = base()
  if variant == "tiny":  # unit and end-to-end tests: seconds on one CPU core
    c.model.update(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                   dtype="float32")
    c.data.update(num_documents=400, tokenizer_vocab_size=256)
    c.train.update(batch_size=8, seq_len=32, num_steps=20, log_every=5, checkpoint_every=10,
                   num_samples=1, sample_steps=4, sample_length=8)
    c.optim.update(warmup_steps=5, peak_lr=3e-3)
  elif variant == "demo":  # README command: a few minutes on a 2-core CPU
    c.model.update(vocab_size=512, d_model=128, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=384,
                   dtype="float32")  # CPUs have no fast bf16 matmul; accelerators should use bfloat16
    c.data.update(num_documents=20000, tokenizer_vocab_size=512)
    c.train.update(batch_size=32, seq_len=128, num_steps=600, log_every=50, checkpoint_every=200,
                   eval_every=200, num_samples=4, sample_steps=32, sample_length=32)
    c.optim.update(peak_lr=2e-3, warmup_steps=50, decay_steps=120)
  elif variant in ("llada_1b", "llada_8b"):  # the paper's shapes (REFERENCE §1), released tokenizer ids
    big = variant == "llada_8b"
    c.model.update(vocab_size=126464, d_model=4096 if big else 2048, num_layers=32 if big else 22,
                   num_heads=32, num_kv_heads=32 if big else 4, mlp_dim=12288 if big else 5634,
                   remat_policy="full", attention_impl="auto", loss_chunk_size=1024,
                   mlp_pad_to=128)
    c.diffusion.mask_token_id = 126336
    c.data.tokenizer_vocab_size = 32000
    c.train.update(batch_size=1280, seq_len=4096, num_steps=500000, checkpoint_every=1000)
    c.optim.update(peak_lr=4e-4, warmup_steps=2000)
  elif variant == "illada_8b":  # iLLaDA-8B (REFERENCE §12): GQA 32/8, tied embeddings, 8k context, mask 5
    c.model.update(vocab_size=155136, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, mlp_dim=14336,
                   max_seq_len=8192, tie_embeddings=True, remat_policy="full", attention_impl="auto",
                   loss_chunk_size=1024)
    c.diffusion.mask_token_id = 5
    c.data.tokenizer_vocab_size = 32000
    c.train.update(batch_size=1280, seq_len=8192, num_steps=500000, checkpoint_every=1000)
    c.optim.update(peak_lr=4e-4, warmup_steps=2000)
  elif variant == "moe_tiny":  # the tiny preset with a routed FFN: MoE unit and end-to-end tests
    c.model.update(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=32,
                   num_experts=8, experts_per_token=2, qk_norm=True, dtype="float32")
    c.data.update(num_documents=400, tokenizer_vocab_size=256)
    c.train.update(batch_size=8, seq_len=32, num_steps=20, log_every=5, checkpoint_every=10,
                   num_samples=1, sample_steps=4, sample_length=8)
    c.optim.update(warmup_steps=5, peak_lr=3e-3)
  elif variant == "llada_moe_7b_a1b":  # LLaDA-MoE-7B-A1B (REFERENCE §13): 64 experts, 8 active, QK-norm
    c.model.update(vocab_size=157184, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=16, mlp_dim=1024,
                   num_experts=64, experts_per_token=8, qk_norm=True, rope_theta=50000.0, max_seq_len=8192,
                   remat_policy="full", attention_impl="auto", loss_chunk_size=1024)
    c.diffusion.mask_token_id = 156895
    c.data.tokenizer_vocab_size = 32000
    c.mesh.update(rule_set="fsdp_ep")
    c.train.update(batch_size=1024, seq_len=8192, num_steps=500000, checkpoint_every=1000)
    c.optim.update(peak_lr=4e-4, warmup_steps=2000)
  return c
