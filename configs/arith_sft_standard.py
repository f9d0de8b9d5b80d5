"""ARITH-CHAIN SFT, arm S (spec/trims.md): standard random masking, 1/t weight, per-sequence norm.

Starts from the pretrained student (configs/arith_pretrain.py) and reads the teacher-scored SFT set:

  python -m dlm_jax.train --config=configs/arith_pretrain.py --workdir=workdirs/arith/pretrain
  python -m dlm_jax.train --config=configs/arith_teacher.py --workdir=workdirs/arith/teacher
  python -m dlm_jax.score_difficulty --teacher_workdir=workdirs/arith/teacher \
      --data=arith:seed=11,n=1000 --out=workdirs/arith/sft_seed11.npz
  python -m dlm_jax.train --config=configs/arith_sft_standard.py --workdir=workdirs/arith/sft_S

Other arms change only the masking and the loss weight: arith_sft_standard_uniform.py (S-u),
arith_sft_trims.py (T-hard), arith_sft_trims_easy.py (T-easy), arith_sft_trims_rand.py (T-rand).
Same optimiser for all: AdamW 3e-4, warm-up 50, cosine to 3e-5, 800 steps, batch 32, same data
order and seed.
"""

from configs import arith_pretrain

PRETRAIN_WORKDIR = "workdirs/arith/pretrain"
SFT_SET = "workdirs/arith/sft_seed11.npz"


def get_config():
  c = arith_pretrain.get_config()
  c.data.path = SFT_SET                  # scored set (score_difficulty); every arm reads the same
  c.train.init_from = PRETRAIN_WORKDIR   # pretrained student
  c.trims.masking = "random"
  c.trims.weighting = "inv_t"
  c.diffusion.normalize = "sequence"     # LLaDA SFT: (1/B) sum_b (1/t_b) sum_l CE / n_b
  c.diffusion.time_sampling = "example"  # t from the example's key: masks follow the example
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 50
  c.optim.decay = "cosine"
  c.optim.min_lr_ratio = 0.1
  c.optim.ema_decay = 0.0
  c.train.num_steps = 800
  c.train.global_batch_size = 32
  c.train.log_every = 100
  c.train.eval_every = 100_000           # no NELBO evaluation during SFT (evaluate task accuracy)
  c.train.ckpt_every = 400
  return c
