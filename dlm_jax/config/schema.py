"""The schema every config shares: each field with its default and type.

Recipes (`configs/*.py`: paper-scale `*_owt.py`, tiny embedded `*_tiny.py`, the CPU toys) start
from `get_config()` here and change values only; a field that is not defined here is an error.
Fields that moved keep their old name for one release as a deprecated alias (see `ALIASES`):
setting the old name still works and logs a warning naming the new one.
"""

import ml_collections
from ml_collections import config_dict

# Old name -> new name of the fields that moved (kept as typed placeholders for one release).
ALIASES = {
    "diffusion.did_variant": "did.variant",
    "diffusion.did_max_log_count": "did.max_log_count",
    "diffusion.did_pack": "did.pack",
    "diffusion.did_pack_len": "did.pack_len",
    "diffusion.masking": "trims.masking",
    "diffusion.trims_buckets": "trims.num_buckets",
    "diffusion.trims_p_context": "trims.p_context",
    "diffusion.trims_p_future": "trims.p_future",
    "diffusion.trims_k_law": "trims.k_law",
    "diffusion.sft_weighting": "trims.weighting",
}


# Values that changed meaning: field -> {old value: new value} (configs and checkpoints that
# predate the change keep working; the old value logs a warning).
LEGACY_VALUES = {
    "model.remat": {True: "full", False: "none", "true": "full", "false": "none",
                    "True": "full", "False": "none"},
}


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "mdlm"          # a registered method: mdlm | did | ar
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "bible"    # a registered data source: bible | text | tfds | arith | hmm | hmm_varlen | sft
  c.data.path = ""           # text: .txt / .jsonl file or folder; sft: .jsonl or scored .npz
  c.data.tfds_name = ""      # tfds: e.g. "lm1b" or "openwebtext_local"
  c.data.tfds_data_dir = ""  # tfds: where the prepared ArrayRecord files are
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.tokenizer = "bpe"   # gpt2 | bpe | bytes | file:/path/tokenizer.json
  c.data.vocab_size = 4096   # bpe only: size of the trained byte-level BPE
  c.data.seq_len = 128
  c.data.packing = "pack"    # pack (segment ids) | pad (one document per row)
  c.data.shuffle = True
  c.data.prefetch = 2        # batches prepared ahead on a host thread
  c.data.min_len = 8         # hmm_varlen: document lengths are U{min_len .. seq_len - 1}
  c.data.pad_as_token = False  # hmm_varlen: padding = PAD tokens the model masks and predicts
                               # (RADD-style masked baseline) instead of slots outside the document

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.mlp_ratio = 4
  c.model.max_len = 1024
  c.model.dropout = 0.0
  c.model.dtype = "float32"  # float32 | bfloat16 (compute; params stay float32)
  c.model.attention = "xla"  # a registered attention backend: xla | pallas, or auto
  c.model.time_conditioning = False
  c.model.cond_dim = 128
  c.model.remat = "none"     # rematerialisation policy per block: none | full | attention | dots
  c.model.rope_theta = 10000.0
  c.model.position_embedding = "rope"  # rope | learned (absolute positions, as in spec/trims.md's toy)
  c.model.tie_embeddings = False
  # What the published PyTorch MDLM DiT has (python -m dlm_jax.import_mdlm sets these; the
  # defaults are the dlm-jax network):
  c.model.adaln_always = False         # time MLP + adaLN even when time_conditioning is off (t = 0)
  c.model.ln_scale_with_adaln = False  # LayerNorms keep their learned scale under adaLN too
  c.model.ln_eps = 1e-6
  c.model.ln_fast_variance = True      # E[x^2] - E[x]^2; False: two-pass E[(x - mean)^2] (torch)
  c.model.rope_freqs = "neg_power"     # neg_power: theta^(-2i/D) | reciprocal: 1/theta^(2i/D) (torch)

  # Masked diffusion (MDLM and the shared noise/time settings of every diffusion method).
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "loglinear"  # loglinear | cosine
  c.diffusion.eps = 0.0
  c.diffusion.t_min = 1e-3
  c.diffusion.time_sampling = "stratified"  # stratified | vdm | iid | example (t from the example's key)
  c.diffusion.normalize = "token"           # token | sequence | sum
  c.diffusion.eval_num_t = 8                # t-draws per sequence for reported NELBO
  # DID (method 'did').
  c.did = ml_collections.ConfigDict()
  c.did.variant = "variable"                # variable (DISE, count head) | fixed (DICE, seqnorm)
  c.did.max_log_count = 6.931471805599453   # log(1024)
  c.did.pack = True                         # pack surviving tokens of several rows together
  c.did.pack_len = 0                        # model row length holding 2 rows' survivors (0 = auto, ~1.125 L)

  # Supervised fine-tuning masks and weights (standard masking, TRIMS and its ablations).
  c.trims = ml_collections.ConfigDict()
  c.trims.masking = "random"                # random | trims | trims_easy_first | random_buckets
  c.trims.weighting = "inv_t"               # inv_t (NELBO weight) | uniform (mean CE over masked slots)
  c.trims.num_buckets = 8
  c.trims.p_context = 0.05
  c.trims.p_future = 0.95
  c.trims.k_law = "uniform"                 # uniform | tied_to_t

  # Deprecated aliases (one release): the old names as typed placeholders (None = not set).
  for old, new in ALIASES.items():
    section, name = old.split(".")
    new_section, new_name = new.split(".")
    c[section][name] = config_dict.placeholder(type(c[new_section][new_name]))

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 2500
  c.optim.decay = "constant"  # constant | cosine | linear
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999  # 0 disables EMA
  c.optim.ema_warmup = False  # decay at update n: min(ema_decay, (1 + n) / (10 + n))
  c.optim.grad_accum_steps = 1  # micro-batches per update: global_batch_size rows in k slices

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 512
  c.train.num_steps = 1_000_000
  c.train.log_every = 50
  c.train.eval_every = 5000
  c.train.eval_batches = 16
  c.train.ckpt_every = 5000
  c.train.keep_ckpts = 3        # the newest k checkpoints are kept ...
  c.train.keep_period = 0       # ... plus every step that is a multiple of this (0 = none)
  c.train.nan_policy = "stop"   # stop | skip
  c.train.init_from = ""        # workdir of a checkpoint to start from (fine-tuning)
  c.train.print_batch = True    # decode one batch at start-up (catches tokenizer/packing bugs)
  c.train.lease_stale_secs = 300.0  # the workdir lease goes stale this long after its last renewal

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.sample = ml_collections.ConfigDict()
  c.sample.decoder = ""           # a registered decoder of the method; "" = the method's default
  c.sample.num_samples = 4
  c.sample.batch_size = 4
  c.sample.num_steps = 128
  c.sample.gen_len = 0            # 0 = data.seq_len
  c.sample.block_len = 32
  c.sample.tau = 0.9
  c.sample.t_final = 0.0
  c.sample.use_cache = True
  c.sample.reference = False      # True: the original decoders (full [B, L, V] logits every step)
  c.sample.r2 = ""                # comma list of conf,token,stability (threshold decoder)
  c.sample.prompt = ""
  c.sample.capacity = 0           # did: max length (0 = data.seq_len)
  c.sample.seed = 0
  return c
