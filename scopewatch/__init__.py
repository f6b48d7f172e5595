"""scopewatch: CLI, settings and the local stack launcher.

The pipeline itself lives in the top-level packages ``collectors``, ``stream_jobs``,
``schemas``, ``detections`` and ``dashboards``.
"""

__version__ = "0.1.0"
