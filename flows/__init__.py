"""Prefect orchestration of the cellm build pipeline (thin tasks over ``cellm`` library calls).

Flows: ``build-int8``, ``build-int4``, ``build-mixed-int4`` (see :mod:`flows.build`).
"""
