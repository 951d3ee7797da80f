"""Token-reduction methods with learned parameters, one module per method.

VisionZip has no parameters: it is the ``compress`` op and its reducer in ``integrations.core``.
``vistog`` is VisToG (docs/vistog.md): learnable semantic tokens with isolated attention and a
grouping layer. Nothing here imports transformers; the towers are read through the attribute
layout that transformers' CLIP / SigLIP vision models share.
"""
