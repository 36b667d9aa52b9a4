"""Rewards for RL and evaluation: one interface (base.py), registered by name.

Importing the package registers the built-in rewards: ``tiny_world``, ``ocr``, ``clip``, ``vlm_judge``.
"""

from deepgen.rewards import clip, judge, ocr, tiny_world  # noqa: F401
