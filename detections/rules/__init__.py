"""The rule catalog: one module per rule, module name == rule id (see :mod:`detections.rulebase`).

Each module defines ``RULE`` (a :class:`detections.rulebase.Rule`). Modules whose name starts
with ``_`` are not rules. :mod:`detections.catalog` discovers, validates and runs them.
"""
