"""The matrix products of the ops: :func:`dot`, through which im2col's product, deconvolution's
and :func:`fnlayers.dense` go.

Every product accumulates in float32 (``acc_dtype``). For float32 and wider operands :func:`dot`
is ``lax.dot_general`` itself, the program unchanged. For float16/bfloat16 operands JAX's own
derivative of ``dot_general(a, b, preferred_element_type=float32).astype(low)`` gives the
backward products a float32 cotangent, and each then widens its low-precision operand to meet
it: two of a training step's three products per layer would run in float32, at a fraction of an
accelerator's low-precision rate. :func:`dot` of low-precision operands therefore carries its
own VJP: the cotangent is rounded to the operands' dtype, as the forward rounds its output, and
each operand's gradient is a low x low product accumulated in float32, rounded to the operand's
dtype -- the products of a float32 step with the operands rounded (and what Flax computes).

Being a ``jax.custom_vjp``, a low-precision product has reverse-mode derivatives only:
``jax.jvp`` of a bfloat16 convolution raises; float32 is unaffected.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax import lax

from fnlayers._checks import acc_dtype
from fnlayers._typing import Array, DTypeLike

__all__ = ["DimensionNumbers", "dot"]

#: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``, as ``lax.dot_general``.
DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], ...]]


def dot(
    a: Array, b: Array, dimension_numbers: DimensionNumbers, out_dtype: DTypeLike | None = None
) -> Array:
    """``lax.dot_general(a, b, dimension_numbers)`` accumulated in float32 (or wider), in
    ``out_dtype`` (default ``a.dtype``).

    Args:
      a, b: floating arrays of one dtype.
      dimension_numbers: as ``lax.dot_general``'s, tuples of ints.
      out_dtype: the result's dtype: ``a.dtype`` (rounded from the accumulator once), or the
        accumulation dtype to keep the accumulator (e.g. to add a bias before rounding).

    Returns:
      The product; batch axes first, then ``a``'s free axes, then ``b``'s, as ``dot_general``.
      For float16/bfloat16 operands the gradients are computed as described in the module's
      docstring (low-precision products, float32 accumulation).
    """
    acc = acc_dtype(a.dtype)
    out = np.dtype(a.dtype if out_dtype is None else out_dtype)
    dn = _static(dimension_numbers)
    if acc == a.dtype:
        return lax.dot_general(a, b, dn, preferred_element_type=acc).astype(out)
    a, b = _same_varying_axes(a, b)
    return _low_dot(a, b, dn, out)


def _static(dimension_numbers):
    """The dimension numbers as nested tuples of Python ints (hashable: a static argument)."""
    (lc, rc), (lb, rb) = dimension_numbers
    return (tuple(map(int, lc)), tuple(map(int, rc))), (tuple(map(int, lb)), tuple(map(int, rb)))


def _same_varying_axes(a, b):
    """``a`` and ``b`` varying over the same manual axes (inside ``shard_map`` with
    ``check_vma``): a weight replicated over the axes the batch varies over is cast to varying,
    as ``dot_general`` itself does; the transpose of that cast sums the weight's gradient over
    the axes, so the custom rule's gradient (varying, like its operands) comes back replicated."""
    vma_a, vma_b = _varying(a), _varying(b)
    if vma_a - vma_b:
        b = lax.pcast(b, tuple(sorted(vma_a - vma_b)), to="varying")
    if vma_b - vma_a:
        a = lax.pcast(a, tuple(sorted(vma_b - vma_a)), to="varying")
    return a, b


def _varying(x):
    """The manual mesh axes ``x`` varies over: ``aval.mat.varying`` (jax 0.10), ``aval.vma``
    in the releases that named it so; empty outside ``shard_map`` or without ``check_vma``."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    return mat.varying if mat is not None else getattr(aval, "vma", frozenset())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _low_dot(a, b, dn, out):
    return lax.dot_general(a, b, dn, preferred_element_type=acc_dtype(a.dtype)).astype(out)


def _low_dot_fwd(a, b, dn, out):
    return _low_dot(a, b, dn, out), (a, b)


def _low_dot_bwd(dn, out, residuals, ct):
    a, b = residuals
    ct = ct.astype(a.dtype)
    (a_contract, b_contract), (a_batch, b_batch) = dn
    swapped = ((b_contract, a_contract), (b_batch, a_batch))
    return _operand_grad(ct, a, b, dn), _operand_grad(ct, b, a, swapped, swap_ans=True)


def _operand_grad(ct, x, y, dn, swap_ans=False):
    """The gradient in ``x`` of ``<ct, dot_general(x, y, dn)>`` (``dot_general(y, x, ...)`` when
    ``swap_ans``), as one ``ct``-times-``y`` product accumulated in float32 and rounded to
    ``x.dtype``: JAX's transpose rule of ``dot_general`` (``lax._dot_general_transpose_lhs``)
    with the product's accumulation dtype made explicit."""
    (x_contract, y_contract), (x_batch, y_batch) = dn
    x_kept = [i for i in range(x.ndim) if i not in x_contract and i not in x_batch]
    y_kept = [i for i in range(y.ndim) if i not in y_contract and i not in y_batch]
    # The axes of ct: the batch axes, then the free axes of the left operand, then the right's.
    nb = len(x_batch)
    ct_batch = tuple(range(nb))
    if swap_ans:
        ct_y = tuple(range(nb, nb + len(y_kept)))
    else:
        ct_y = tuple(range(nb + len(x_kept), nb + len(x_kept) + len(y_kept)))
    dims = ((ct_y, tuple(y_kept)), (ct_batch, tuple(y_batch)))
    # The product's axes: x's batch axes, x's free axes, then x's contracted axes in y's order.
    x_contract_by_y = [x_contract[i] for i in np.argsort(y_contract)]
    axes = [*x_batch, *x_kept, *x_contract_by_y]
    grad = lax.dot_general(
        ct,
        y,
        dims,
        preferred_element_type=acc_dtype(x.dtype),
        out_sharding=_permuted_sharding(x, axes),
    )
    return grad.transpose(tuple(int(i) for i in np.argsort(axes))).astype(x.dtype)


def _permuted_sharding(x, axes):
    """``x``'s sharding with its axes in the order ``axes`` when the mesh puts shardings in the
    types (Explicit axes), where a product that contracts a sharded axis must be told where its
    result goes (the weight's gradient sums over the sharded batch); None otherwise."""
    if not jax.sharding.get_abstract_mesh().explicit_axes:
        return None
    sharding = jax.typeof(x).sharding
    spec = tuple(sharding.spec[i] if i < len(sharding.spec) else None for i in axes)
    return sharding.update(spec=jax.sharding.PartitionSpec(*spec))


_low_dot.defvjp(_low_dot_fwd, _low_dot_bwd)
