"""The services' own layer, below the CLI: what the sink, the decision worker and the pager need to
run as processes, and nothing of the CLI (``scopewatch``) or of the other services.

* :mod:`~stream_jobs.runtime.settings`: ``Settings`` (pydantic-settings, env prefix ``SCOPEWATCH_``);
* :mod:`~stream_jobs.runtime.lifecycle`: logging during a Kafka outage, the wait for Kafka at start,
  signals and the bounded stop;
* :mod:`~stream_jobs.runtime.files`: atomic state files and process identity (stats, pid, tokens);
* :mod:`~stream_jobs.runtime.kafka_admin`: topic creation and listing.

Order (``tests/unit/test_import_contract.py``): ``schemas`` <- ``detections`` <- this package <-
the rest of ``stream_jobs`` <- ``scopewatch``. It imports nothing else of ours.
"""
