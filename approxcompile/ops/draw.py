"""The sampling draw as a ``torch.library`` custom op, so compiled graphs keep it whole.

``torch.compile`` cannot trace what a draw needs around :func:`~approxcompile.ops.sampling.sample_pairs`:
the weight-keyed streams and records of :mod:`approxcompile.ops.shared` (weak dictionaries)
and host-side checks on the scores. As a custom op the draw is one opaque node in the graph:

    scores -> approxcompile::draw(scores, weight, k, method, ...) -> (index, scale)

Randomness: the kernel draws from torch's generator at run time, so ``torch.manual_seed``
governs compiled and eager models alike; the op is tagged ``nondeterministic_seeded`` so the
compiler's partitioner never recomputes (redraws) it in the backward pass. A weight's own
stream (``seed``) or a caller's ``torch.Generator`` reach the kernel by number: a generator
is no op argument type, so :func:`generator_handle` files it in a small table
(eager-only; under ``torch.compile`` pass ``seed`` instead).

Output sizes are static except for ``bernoulli``, whose count is random: compiling that
method needs ``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` (else
Dynamo splits the graph there).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from approxcompile.ops import shared
from approxcompile.ops.eager import direct
from approxcompile.ops.sampling import sample_pairs

_GENERATORS: OrderedDict[int, torch.Generator] = OrderedDict()
_MAX_GENERATORS = 64  # a backward-sampled op looks its generator up at backward time


def generator_handle(generator: torch.Generator | None) -> int | None:
    """A number that :func:`lookup` turns back into ``generator`` (``None`` for torch's own)."""
    if generator is None:
        return None
    key = id(generator)
    _GENERATORS[key] = generator
    _GENERATORS.move_to_end(key)
    while len(_GENERATORS) > _MAX_GENERATORS:
        _GENERATORS.popitem(last=False)
    return key


def lookup(handle: int | None) -> torch.Generator | None:
    if handle is None:
        return None
    try:
        return _GENERATORS[handle]
    except KeyError as e:
        raise RuntimeError(
            f"approxcompile: generator #{handle} is no longer known to the sampled ops; more than "
            f"{_MAX_GENERATORS} generators were passed since, keep fewer alive or pass seed="
        ) from e


def draw_kernel(
    scores: Tensor,
    weight: Tensor,
    k: int,
    method: str,
    eps: float,
    seed: int | None,
    generator: int | None,
    record: bool,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``sample_pairs(scores, k, method)`` -> ``(index, scale)``; ``scale`` is empty for ``topk``.

    ``seed`` picks ``weight``'s own stream (:func:`approxcompile.ops.shared.stream`) unless
    ``generator`` names one; ``record`` files the indices for the data-parallel hook;
    ``noise``: the uniform draws to use instead of drawing (``estimator.noise_size``).
    """
    index, scale = _draw(scores, weight, k, method, eps, seed, lookup(generator), record, noise)
    return index, scores.new_empty(0, dtype=torch.float32) if scale is None else scale


def _draw(
    scores: Tensor,
    weight: Tensor,
    k: int,
    method: str,
    eps: float,
    seed: int | None,
    generator: torch.Generator | None,
    record: bool,
    noise: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """The draw of :func:`draw_kernel` and of plain :func:`draw_pairs` calls; ``scale=None`` for ``topk``."""
    gen = generator
    if gen is None and seed is not None:
        gen = shared.stream(weight, seed, enabled=True)
    index, scale = sample_pairs(scores, k, method, eps=eps, generator=gen, noise=noise)
    if record:
        shared.record(weight, index, enabled=True)
    return index, scale


# The op is the kernel itself: compiled graphs, fake tensors and flop counters see one opaque
# op; plain eager calls take ``draw_kernel`` directly (:func:`draw_pairs`).
draw = torch.library.custom_op(
    "approxcompile::draw", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)(draw_kernel)


@draw.register_fake
def _draw_fake(
    scores: Tensor,
    weight: Tensor,
    k: int,
    method: str,
    eps: float,
    seed: int | None,
    generator: int | None,
    record: bool,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    n: int | torch.SymInt = k
    if method == "bernoulli":
        n = torch.library.get_ctx().new_dynamic_size()
    index = scores.new_empty(n, dtype=torch.long)
    return index, scores.new_empty(0 if method == "topk" else n, dtype=torch.float32)


def draw_pairs(
    scores: Tensor,
    weight: Tensor,
    k: int,
    method: str,
    *,
    eps: float,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    plain: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """What the sampled ops call: the draw, with ``scale=None`` for ``topk``.

    The stream and the record follow autograd as they did before compilation: a forward
    without autograd draws from torch's generator and records nothing (``shared``).
    ``plain``: the caller has found this a plain eager call (``ops.eager.direct``) already, which
    saves checking again.
    """
    grad = torch.is_grad_enabled()
    if plain and direct(noise):  # the kernel's work, without the op's argument encoding
        with torch.no_grad():
            seed = seed if grad else None
            return _draw(scores.detach(), weight, k, method, eps, seed, generator, grad, noise)
    fn = draw_kernel if direct(scores, weight, noise) else draw
    with torch.no_grad():
        index, scale = fn(
            scores.detach(),
            weight,
            k,
            method,
            eps,
            seed if grad else None,
            generator_handle(generator),
            grad,
            noise,
        )
    # The kernel sends "no scale" as an empty tensor (topk); bernoulli always keeps >= 1 pair,
    # and its count is data-dependent, so only the other methods' static sizes are read here.
    return index, None if method != "bernoulli" and scale.shape[0] == 0 else scale
