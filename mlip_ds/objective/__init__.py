"""The training objective, in one place: ``Objective`` (task.py) prepares a batch, computes and
weighs its terms, and updates the model after each optimizer step; the training loop calls only it.

  batch.py   BatchPreparer: loader batch -> the forward's inputs (knowledge, categories, swaps)
  terms.py   compute_terms: model outputs -> the unweighted loss terms (``losses/*``)
  checks.py  check_objective: the switches against the model, batch and ZeRO stage, before any build
  task.py    Objective: the two above, the weights (``losses.objective``), the prototype freeze,
             the co-occurrence prior of a skipped step, the EMA and prototype updates, the export

The configuration (``ObjectiveConfig``, the term weights) is ``losses/objective.py``, the presets
``config.py``; the parts the terms need are built by ``model/mlip.py``.
"""
from mlip_ds.objective.task import Objective

__all__ = ["Objective"]
