"""Pluggable loss terms for the semi-supervised trainer: a method is a list of them.

- :mod:`.terms`: ``StepContext`` (what a term reads in one iteration), ``LossTerm``, supervised, cross-teaching
  and registration-supervision terms; :mod:`.schedules`: weight schedules (ramp-ups).
- :mod:`.contrastive`: SCL, MCSC, MCSCv2 and their public helpers (``ContrastiveTerm``, ``embed_students``,
  sampling, InfoNCE); :mod:`.reps` and :mod:`.memory`: registration positives and the feature memories.
- :mod:`.teacher`: the EMA teacher and the MT family (MT, UAMT, FixMatch, HSTF, hybrid).
- :mod:`.infonce`, :mod:`.dale`, :mod:`.scribble`, :mod:`.diffusion`: InfoNCE pretraining branch, noisy-label
  (DALE), scribble (PCLMix, partial CE) and diffusion-refinement terms (the refiner itself, used at inference,
  is :mod:`monai_ssl.networks.refiner`).

Terms never take the students: what a term builds from them (an EMA teacher, projector channels) it builds in
``LossTerm.bind``, which :func:`.terms.bind_terms` calls before the optimiser is made.

Entropy is :func:`monai_ssl.metrics.uncertainty.entropy`, the one implementation every term uses.
"""
