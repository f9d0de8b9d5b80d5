"""The schema every config shares: each field with its default and type.

Paper-scale configs (`*_owt.py`) and tiny embedded ones (`*_tiny.py`) start from
`get_config()` here and change values only; a field that is not defined here is an error.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "mdlm"          # registry name: mdlm | did | ar
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "bible"    # bible | text | tfds | arith | hmm | sft (prompt/response SFT)
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

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.mlp_ratio = 4
  c.model.max_len = 1024
  c.model.dropout = 0.0
  c.model.dtype = "float32"  # float32 | bfloat16 (compute; params stay float32)
  c.model.attention = "xla"  # xla | pallas | auto
  c.model.time_conditioning = False
  c.model.cond_dim = 128
  c.model.remat = False
  c.model.rope_theta = 10000.0
  c.model.position_embedding = "rope"  # rope | learned (absolute positions, as in spec/trims.md's toy)
  c.model.tie_embeddings = False

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "loglinear"  # loglinear | cosine
  c.diffusion.eps = 0.0
  c.diffusion.t_min = 1e-3
  c.diffusion.time_sampling = "stratified"  # stratified | vdm | iid | example (t from the example's key)
  c.diffusion.normalize = "token"           # token | sequence | sum
  c.diffusion.eval_num_t = 8                # t-draws per sequence for reported NELBO
  # DID only.
  c.diffusion.did_variant = "variable"      # variable (DISE, count head) | fixed (DICE, seqnorm)
  c.diffusion.did_max_log_count = 6.931471805599453  # log(1024)
  c.diffusion.did_pack = True               # pack surviving tokens of several rows together
  c.diffusion.did_pack_len = 0              # model row length holding 2 rows' survivors (0 = auto, ~1.125 L)
  # SFT / TRIMS.
  c.diffusion.masking = "random"            # random | trims | trims_easy_first | random_buckets
  c.diffusion.trims_buckets = 8
  c.diffusion.trims_p_context = 0.05
  c.diffusion.trims_p_future = 0.95
  c.diffusion.trims_k_law = "uniform"       # uniform | tied_to_t
  c.diffusion.sft_weighting = "inv_t"       # inv_t | uniform

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

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 512
  c.train.num_steps = 1_000_000
  c.train.log_every = 50
  c.train.eval_every = 5000
  c.train.eval_batches = 16
  c.train.ckpt_every = 5000
  c.train.keep_ckpts = 3
  c.train.nan_policy = "stop"   # stop | skip
  c.train.init_from = ""        # workdir of a checkpoint to start from (fine-tuning)
  c.train.print_batch = True    # decode one batch at start-up (catches tokenizer/packing bugs)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.sample = ml_collections.ConfigDict()
  c.sample.decoder = "ancestral"  # ancestral | threshold | fixed_k | did
  c.sample.num_samples = 4
  c.sample.batch_size = 4
  c.sample.num_steps = 128
  c.sample.gen_len = 0            # 0 = data.seq_len
  c.sample.block_len = 32
  c.sample.tau = 0.9
  c.sample.t_final = 0.0
  c.sample.use_cache = True
  c.sample.r2 = ""                # comma list of conf,token,stability (threshold decoder)
  c.sample.prompt = ""
  c.sample.capacity = 0           # did: max length (0 = data.seq_len)
  c.sample.seed = 0
  return c
