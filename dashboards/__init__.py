"""Grafana dashboards and alert rules as code, on the ClickHouse datasource plugin.

``model`` (typed builders), ``boards`` (the four dashboards and their SQL), ``alerts`` (alert rules
for the main detections), ``macros`` (the plugin's macros, expanded as Grafana would, for tests and
previews), ``build`` (everything as one bundle, and the provisioning files), ``provision`` (the
bundle into a running Grafana through grafana-client, idempotently). CLI: ``scopewatch dashboards``.
"""
