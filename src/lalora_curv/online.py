r"""Sequential tasks: the online Laplace update of a precision (online EWC with a decay).

After fine-tuning on task ``t`` the adapter sits at ``theta_t``. The Laplace approximation of
the posterior over everything seen so far is recursive (Ritter et al., 2018, "Online Structured
Laplace Approximations for Overcoming Catastrophic Forgetting"; Schwarz et al., 2018, "Progress
& Compress", for the decay):

.. math::

    \Lambda_t = \gamma\, \Lambda_{t-1} + N_t F_t, \qquad \mu_t = \theta_t,

with ``F_t`` the mean Fisher per supervised token of task ``t`` at ``theta_t`` and ``gamma`` in
``(0, 1]`` a decay that lets old tasks fade. Training on task ``t + 1`` then adds
``lam * (theta - theta_t)^T P_t (theta - theta_t)``, with ``P_t`` the precision normalised per
token as every precision of this library is (``P_t = Lambda_t / N``, ``N`` all tokens so far;
``lam`` absorbs the constant, see :mod:`lalora_curv.precision.base`).
"""

from __future__ import annotations

from lalora_curv.errors import IncompatiblePrecisionError, LaloraError
from lalora_curv.precision import Precision


def online_laplace(previous: Precision, new: Precision, decay: float = 1.0) -> Precision:
    r"""The precision after one more task: ``decay * previous`` at ``new``'s mode, plus ``new``.

    .. math::

        P_t = \frac{\gamma N_{t-1} P_{t-1}|_{\mu_t} + N_t F_t}{N_{t-1} + N_t}, \qquad
        \mu_t = \text{new.mode}

    ``P_{t-1}|_{mu_t}`` is :meth:`Precision.recentred`: the quadratic kept and its centre
    moved (diag, ekfac: the online-EWC step), or, for the structures built from base-layer
    statistics (the K-FAC family, merged-diag), the LoRA-space blocks derived again at
    ``mu_t``. Token counts add (``N_t`` the new precision's supervised tokens), so the
    result pools like :meth:`Precision.__add__`; ``decay = 1`` is the plain online Laplace.

    Args:
        previous: the precision used while training on the last task (mode ``theta_{t-1}``,
            e.g. the source precision at the adapter's init, or an earlier result of this
            function).
        new: fitted with :func:`lalora_curv.fit_precision` on the last task's data *after*
            training on it, on the same adapter (its mode is ``theta_t``), with the same
            structure and estimator.
        decay: ``gamma`` in ``(0, 1]``.

    Raises:
        IncompatiblePrecisionError: other structures, estimators, modules or shapes; EKFAC
            (its eigenbasis is fitted at one point on one data set: a sum over tasks has none).
        LaloraError: a decay outside ``(0, 1]``.
    """
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay <= 1:
        raise LaloraError(f"decay must be in (0, 1], got {decay!r}")
    if not isinstance(previous, Precision) or not isinstance(new, Precision):
        raise LaloraError(
            f"online_laplace takes two precisions, got {type(previous).__name__} and "
            f"{type(new).__name__}"
        )
    if type(previous) is not type(new):
        raise IncompatiblePrecisionError(
            f"cannot combine a {previous.structure!r} precision with a {new.structure!r} one: "
            "fit the new task with the same structure"
        )
    if not previous.poolable:  # EKFAC
        raise IncompatiblePrecisionError(
            f"online_laplace has no {previous.structure!r} update: each task's precision has "
            "its own eigenbasis, so their sum is not one of this structure; fit the tasks with "
            "'kfac' (or 'diag'), or recentre the previous one alone "
            "(previous.recentred(new.mode))"
        )
    moved = previous.recentred(new.mode)
    result = (moved * float(decay) if decay != 1 else moved) + new
    meta = result._metadata
    step = {"decay": float(decay), "tokens": int(new.counts.get("supervised_tokens", 0))}
    meta["online"] = [*previous.metadata.get("online", []), step]
    return result
