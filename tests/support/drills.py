"""Fault drills against a whole local stack (its own broker, the production topic names).

A drill drives ``scopewatch up``/``publish``/``sql`` through the CLI, as an operator would, and
checks the outcome against ``scopewatch replay`` over every event it published: 0 calls lost,
0 duplicated, final verdicts and findings equal to replay's.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from scopewatch.stack.stack import worker_assignment
from support.pipeline import cli_env
from support.scenario import bound, grant, jsonl, story, tool_call


def sequence_story(tag: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One delegation whose two sequence findings need calls from both halves.

    First half: the facts, a sensitive read and four violations. Second half: an external send
    (``exfiltration_chain`` with the read) and a fifth violation within the minute
    (``violation_burst``). A worker that lost the delegation's rule state between the halves
    raises neither.
    """
    session, principal, agent = f"{tag}-q", f"carol-{tag}@acme.example", "agent-q"
    first = [
        bound("10:00:00", session, principal, agent),
        grant("10:00:00", f"{tag}-q-grant", principal, agent, ["vault/*", "web/*"]),
        tool_call("10:01:00", f"{tag}-q-read", session, "vault", "get_secret"),
        *(tool_call(f"10:01:{s}", f"{tag}-q-v{s}", session, "db", "drop_table") for s in ("10", "20", "30", "40")),
    ]
    second = [
        tool_call("10:01:50", f"{tag}-q-v50", session, "db", "drop_table"),
        tool_call("10:02:00", f"{tag}-q-send", session, "web", "fetch", ["url:https://paste.example/x"]),
    ]
    return first, second


class Drill:
    """A stack in ``env`` (see ``support.pipeline.stack_env``) and every event published to it."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env = env
        self.folder = folder
        self.events: list[dict[str, Any]] = []
        self.files = 0
        self.errors: list[str] = []

    def cli(self, *args: str, timeout: float = 300) -> Any:
        return cli_env(self.env, *args, timeout=timeout)

    def publish(self, events: list[dict[str, Any]]) -> None:
        self.files += 1
        path = self.folder / f"part-{self.files}.jsonl"
        path.write_text(jsonl(events))
        result = self.cli("publish", str(path))
        assert result.returncode == 0, result.stderr
        self.events.extend(events)

    def load(self, tag: str, stories: int, pause: float) -> threading.Thread:
        """Publish ``stories`` stories one file at a time in the background (the load of a drill)."""

        def run() -> None:
            for i in range(stories):
                try:
                    self.publish(story(f"{tag}{i}"))
                except AssertionError as exc:  # reported by the test through self.errors
                    self.errors.append(str(exc))
                time.sleep(pause)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def sql(self, query: str) -> list[dict[str, Any]]:
        result = self.cli("sql", query, "--format", "json")
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    def call_ids(self) -> list[str]:
        return [str(e["call_id"]) for e in self.events if e["event_type"] == "tool_call"]

    def replay(self) -> dict[str, dict[str, Any]]:
        path = self.folder / "all.jsonl"
        path.write_text(jsonl(self.events))
        result = self.cli("replay", str(path))
        assert result.returncode == 0, result.stderr
        return {d["call_id"]: d for d in map(json.loads, result.stdout.splitlines())}

    def final_verdicts(self, timeout: float = 240.0) -> dict[str, tuple[str, str | None]]:
        """Wait until every published call has a final current verdict; call_id -> (verdict, grant)."""
        ids = self.call_ids()
        quoted = ",".join(f"'{c}'" for c in ids)
        query = (
            "SELECT call_id, argMax(verdict, version) AS verdict, argMax(matched_grant_id, version) AS grant,"
            " argMax(final, version) AS final"
            f" FROM scopewatch.evidence FINAL WHERE call_id IN ({quoted}) GROUP BY call_id"
        )
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = self.sql(query)
            if len(rows) == len(ids) and all(r["final"] for r in rows):
                return {str(r["call_id"]): (str(r["verdict"]), r["grant"]) for r in rows}
            time.sleep(1.0)
        missing = sorted(set(ids) - {str(r["call_id"]) for r in rows})
        raise AssertionError(f"{len(missing)} calls without a final verdict, e.g. {missing[:5]}")

    def findings(self, expected: int, timeout: float = 120.0) -> dict[str, list[str]]:
        """call_id -> sorted rule ids, once at least ``expected`` (call, rule) pairs landed (or timeout)."""
        quoted = ",".join(f"'{c}'" for c in self.call_ids())
        query = (
            "SELECT call_id, arraySort(groupUniqArray(rule_id)) AS rules FROM scopewatch.findings"
            f" WHERE call_id IN ({quoted}) GROUP BY call_id"
        )
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = self.sql(query)
            if sum(len(r["rules"]) for r in rows) >= expected:
                break
            time.sleep(1.0)
        return {str(r["call_id"]): list(r["rules"]) for r in rows}

    def assert_equals_replay(self) -> None:
        """0 lost, 0 duplicated, verdicts and findings as replay gives them for every published call."""
        assert not self.errors, self.errors
        expected = self.replay()
        live = self.final_verdicts()
        wrong = {
            c: (v, expected[c]["verdict"])
            for c, v in live.items()
            if v != (expected[c]["verdict"], expected[c]["matched_grant_id"])
        }
        assert not wrong, (
            f"{len(wrong)} of {len(live)} final verdicts differ from replay, e.g. {list(wrong.items())[:5]}"
        )
        wanted = {c: sorted(d["findings"]) for c, d in expected.items() if d["findings"]}
        got = self.findings(sum(map(len, wanted.values())))
        differ = {c: (got.get(c, []), wanted.get(c, [])) for c in set(got) | set(wanted) if got.get(c) != wanted.get(c)}
        assert not differ, f"findings (live, replay) differ for {len(differ)} calls: {sorted(differ.items())[:8]}"
        quoted = ",".join(f"'{c}'" for c in self.call_ids())
        per_call = self.sql(
            "SELECT call_id, count() AS n FROM scopewatch.evidence_current"
            f" WHERE call_id IN ({quoted}) GROUP BY call_id HAVING n > 1"
        )
        assert per_call == [], per_call
        stored = self.sql(f"SELECT count() AS n FROM scopewatch.tool_calls FINAL WHERE call_id IN ({quoted})")
        assert stored[0]["n"] == len(self.call_ids())

    def worker_pid(self, name: str) -> int:
        record = json.loads((Path(self.env["SCOPEWATCH_HOME"]) / "run" / f"{name}.json").read_text())
        return int(record["pid"])

    def assignment(self, pid: int) -> dict[str, Any] | None:
        return worker_assignment(Path(self.env["SCOPEWATCH_HOME"]) / "run", pid)
