"""Forward FLOPs of the transformer: the one formula behind tokens/s -> TFLOP/s and schedule costs.

One forward pass over a length-L sequence, n_layers blocks of width d, MLP ratio r, vocabulary V
(per token per block: QKV + output projection 8 d^2, MLP 4 r d^2, QK^T and AV 4 L d):
  blocks = L n_layers (8 d^2 + 4 r d^2 + 4 L d)
  full   = L (n_layers (8 d^2 + 4 r d^2 + 4 L d) + 2 d V)   (adds the output projection).
A training step costs about 3x the forward (backward = 2x forward): `train_step_flops`, the "model
FLOPs" of MFU (rematerialisation's recomputation is not counted, nor the adaLN time projections,
which run once per row).
"""

from __future__ import annotations

CONVENTIONS = ("blocks", "full")


def forward_flops(n_layers: int, d: int, seq_len: int, vocab: int, mlp_ratio: float = 4,
                  convention: str = "blocks") -> float:
  """Forward FLOPs of one pass over a length-`seq_len` sequence.

  Args:
    n_layers: transformer blocks.
    d: model width.
    seq_len: L.
    vocab: V (used by "full" only).
    mlp_ratio: MLP hidden width / d.
    convention: "blocks" (transformer blocks only) or "full" (plus the output projection).

  Returns:
    FLOPs as a Python float.
  """
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
  d, seq_len = float(d), float(seq_len)
  per_token_block = 8.0 * d * d + 4.0 * float(mlp_ratio) * d * d + 4.0 * seq_len * d
  per_token = n_layers * per_token_block
  if convention == "full":
    per_token += 2.0 * d * float(vocab)
  return seq_len * per_token


def forward_flops_per_token(cfg, seq_len: int) -> float:
  """Forward FLOPs per token of a `TransformerConfig` ("full" convention)."""
  return forward_flops(cfg.num_layers, cfg.d_model, seq_len, cfg.vocab_size, cfg.mlp_ratio,
                       "full") / float(seq_len)


def train_step_flops(cfg, rows: int, length: int) -> float:
  """Model FLOPs of one training step over `rows` network rows of `length` tokens ("full": 3 x forward).

  `cfg` is a `TransformerConfig` (num_layers, d_model, vocab_size, mlp_ratio). A masked-only head
  (MDLM's) runs the vocabulary projection on about half the rows, so the compiled step does less
  than this count; MFU keeps the conventional dense count.
  """
  return 3.0 * rows * forward_flops(cfg.num_layers, cfg.d_model, length, cfg.vocab_size,
                                    cfg.mlp_ratio, "full")
