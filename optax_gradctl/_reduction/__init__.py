"""The reduction layer: every reduction over a gradient pytree, and applying its results.

A gradient flows through it once per step, down these modules (each imports
only those above it in this list):

=================  ==========================================================
``settings``       how a rescue runs and how leaves are batched
``leaves``         which leaves count; the accumulation dtype
``pow2``           scaled floats ``m * 2**e`` and their exact arithmetic
``mesh``           mesh axes, replica weights, the packed collectives
``steering``       what is written only to shape XLA's program
``plan``           scopes, batches and the common read
``sums``           norm sums: the common read, and the candidates of a rescue
``rescue_branch``  the rescue under ``lax.cond`` (CPU, TPU)
``rescue_select``  the rescue computed alongside and selected (GPU)
``norms``          which of those computes the norms
``moments``        mean and spread per scope
``finer``          norms of units, examples and groups of leaves
``factors``        factors to a target norm, and the exact output
``counting``       the fraction of elements outside a band
``reduce``         the entry point the transforms call
=================  ==========================================================

Sums accumulate in at least float32 (float64 leaves in float64). The
transforms turn the per-scope results into factors and apply them with
:func:`~factors.rescale` or :func:`~factors.apply`, which cast back to each
leaf's dtype.
"""
