"""The allowed values of every string setting, each list written once.

The ``Literal`` types are what mypy checks; the tuples next to them are derived from the
types with ``typing.get_args`` and are what the runtime checks, the CLI's ``choices=`` and
the error messages read. Kept free of torch imports so that every module can use them.
"""

from __future__ import annotations

from typing import Literal, get_args

# How a sampled product picks its column-row pairs:
#   topk      the k largest scores, no scaling (deterministic, biased);
#   crs       k draws with replacement from p = (1-eps)·a/sum(a) + eps/n, scale 1/(k·p_i);
#   bernoulli pair i kept with probability min(1, k·p_i), scale 1/min(1, k·p_i);
#   uniform   k pairs uniformly without replacement, scale n/k;
#   wta_crs   the c most likely pairs exactly (scale 1) and k-c draws with replacement from the
#             rest (CRS, scale P_rest/((k-c)·p_i)), c chosen to minimise the variance bound.
Method = Literal["topk", "crs", "bernoulli", "uniform", "wta_crs"]
METHODS: tuple[Method, ...] = get_args(Method)

# The methods whose estimate is unbiased; backward sampling accepts only these, because a
# biased gradient drifts the training.
UnbiasedMethod = Literal["bernoulli", "crs", "uniform", "wta_crs"]
UNBIASED_METHODS: tuple[UnbiasedMethod, ...] = get_args(UnbiasedMethod)

# Which products a sampled node shrinks: "forward" samples the forward product (and
# backpropagates through the sample); "backward" keeps the forward exact and samples the
# input- and weight-gradient products.
Mode = Literal["forward", "backward"]
MODES: tuple[Mode, ...] = get_args(Mode)

# What forward sampling scores pair i by: the activations and the weight together, or the
# weight alone (the same choice on every data-parallel rank).
Scores = Literal["activations", "weights"]
SCORES: tuple[Scores, ...] = get_args(Scores)

# Backward mode's score of batch row b for the weight gradient: |X[b]|·|dY[b]| or |X[b]|.
RowScores = Literal["x_dy", "x"]
ROW_SCORES: tuple[RowScores, ...] = get_args(RowScores)

# The op types overrides are keyed by and the report shows (``NodePlan.kind``); each op
# kind of ``approxcompile.kinds`` belongs to one of them.
OpType = Literal["linear", "matmul", "conv", "attention"]
OP_TYPES: tuple[OpType, ...] = get_args(OpType)

# How optimize() turns the model into a graph: symbolic tracing, torch.export (one graph per
# mode), torch.compile's dynamo (data-dependent control flow), or the first faithful of these.
Frontend = Literal["auto", "fx", "export", "dynamo"]
FRONTENDS: tuple[Frontend, ...] = get_args(Frontend)

# What happens to scaled_dot_product_attention: left as the fused kernel, exact; or taken
# apart into its two batched products, which the cost model may then sample.
Attention = Literal["exact", "decomposed"]
ATTENTIONS: tuple[Attention, ...] = get_args(Attention)
