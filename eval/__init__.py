"""Evaluation stage: the compliance gap and alignment-faking reasoning, measured through vLLM.

Entry point: ``python -m eval.gap`` (see eval/gap.py).
"""
