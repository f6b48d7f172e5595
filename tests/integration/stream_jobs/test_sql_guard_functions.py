"""The SQL guard's function deny-list against the installed engine's own ``system.functions``.

A newer chDB may add functions that read files, reach the network or reveal the engine's
configuration. Every function whose name or category falls in such a family must be refused
by the guard, through the real parser (:meth:`AnalystSession.inspect`), unless it was reviewed
and found harmless (:data:`REVIEWED_HARMLESS`, each with the reason). A new name in a risky
family fails this test until someone reviews it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_jobs.clickhouse import chdb_path, connect
from stream_jobs.query_server import AnalystSession
from stream_jobs.sql_guard import QueryCaps, QueryRefused

pytestmark = pytest.mark.integration

RISKY_NAME_PARTS = (
    "file",
    "url",
    "s3",
    "hdfs",
    "azure",
    "gcs",
    "executable",
    "process",
    "shell",
    "python",
    "remote",
    "mysql",
    "postgres",
    "mongo",
    "redis",
    "sqlite",
    "odbc",
    "jdbc",
    "kafka",
    "http",
    "dict",
    "model",
    "catboost",
    "bayes",
    "sleep",
    "macro",
    "setting",
    "certificate",
    "secret",
    "password",
    "environ",
    "keeper",
)
RISKY_CATEGORIES = ("AI", "Dictionary", "Embedded Dictionary", "Introspection", "Machine Learning", "Files")

REVIEWED_HARMLESS = {
    # URL functions: they parse the string they are given
    **dict.fromkeys(
        [
            "URLHash",
            "URLHierarchy",
            "URLPathHierarchy",
            "base64URLDecode",
            "base64URLEncode",
            "tryBase64URLDecode",
            "cutURLParameter",
            "decodeURLComponent",
            "decodeURLFormComponent",
            "encodeURLComponent",
            "encodeURLFormComponent",
            "extractURLParameter",
            "extractURLParameterNames",
            "extractURLParameters",
        ],
        "parses a string",
    ),
    "aes_encrypt_mysql": "MySQL-compatible encryption of the given value with the given key",
    "aes_decrypt_mysql": "MySQL-compatible decryption of the given value with the given key",
    "kafkaMurmurHash": "a hash of the given value",
    "getSetting": "the session's own settings: the caps, no credentials",
    "getSettingOrDefault": "the session's own settings: the caps, no credentials",
    "currentProfiles": "names of the session's own settings profiles",
    "defaultProfiles": "names of the session's own settings profiles",
    "enabledProfiles": "names of the session's own settings profiles",
    "naiveBayesNgrams": "splits the given text into n-grams",
    "timeSeriesPredictLinearToGrid": "arithmetic over the given samples ('dict' in 'predict')",
    "mergeTreePartInfo": "parses a part name given as a string",
    "isMergeTreePartCoveredBy": "compares part names given as strings",
    "tid": "the current thread's id",
    "zookeeperSessionUptime": "a number (no Keeper in chDB)",
    # Machine Learning: they compute over the query's own data
    "assignCentroid": "computes over the given values",
    "evalMLMethod": "applies a model state computed in the query",
    "hierarchicalKMeans": "computes over the given values",
    "stochasticLinearRegression": "an aggregate over the query's rows",
    "stochasticLogisticRegression": "an aggregate over the query's rows",
}


@pytest.fixture
def session(tmp_path: Path) -> Iterator[AnalystSession]:
    owner = connect(f"chdb://{tmp_path / 'chdb'}")
    path = chdb_path(owner)
    assert path is not None
    analyst = AnalystSession(path, QueryCaps())
    try:
        yield analyst
    finally:
        analyst.close()
        owner.close()


def _functions(session: AnalystSession) -> list[tuple[str, str]]:
    text = session._text("SELECT name, categories FROM system.functions ORDER BY name", "TSVRaw")
    return [(name, category) for name, _, category in (line.partition("\t") for line in text.splitlines())]


def test_every_risky_function_the_engine_lists_is_refused_or_reviewed(session: AnalystSession) -> None:
    functions = _functions(session)
    assert len(functions) > 1000, "system.functions looks empty"
    risky = {
        name
        for name, category in functions
        if any(part in name.lower() for part in RISKY_NAME_PARTS) or category in RISKY_CATEGORIES
    }
    assert {"file", "dictGet", "aiGenerate", "sleep", "getServerSetting", "decodeURLComponent"} <= risky
    let_through = []
    for name in sorted(risky):
        sql = f"SELECT `{name}`('x') FROM numbers(1)"
        if name in REVIEWED_HARMLESS:
            session.inspect(sql)  # reviewed: the guard must not refuse it either
            continue
        try:
            session.inspect(sql)
        except QueryRefused as exc:
            assert "is not allowed" in str(exc), (name, exc)
        else:
            let_through.append(name)
    assert let_through == [], f"review these functions and refuse them in stream_jobs/sql_guard.py: {let_through}"
