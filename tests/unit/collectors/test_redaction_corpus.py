"""Recall over the redaction corpus, false positives over the benign corpus, detect-secrets as a check.

* every format of tests/support/secret_corpus.py (at least 60), in every placement (argument,
  nested object, array, error text, JSON-escaped, %-encoded, base64-wrapped), is redacted:
  recall 100 %;
* every string of tests/data/benign_corpus.jsonl (arguments, keys, resources, error texts:
  SHA-1/SHA-256 hex, UUIDs, git SHAs, paths, URLs without credentials, base64 image data,
  prose) stays as it is: false-positive rate 0;
* Yelp's detect-secrets (all its plugins) finds nothing in the corpus that the catalog misses;
* adversarial 64 KiB inputs finish fast (no catastrophic backtracking).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collectors.redact import PLACEHOLDER, Redactor
from schemas import canonical_json
from support.secret_corpus import SAMPLES, leaks, placements

KEY = b"corpus-key-0123456789abcdef"
BENIGN = Path(__file__).parents[2] / "data" / "benign_corpus.jsonl"


@pytest.fixture(scope="module")
def red() -> Redactor:
    return Redactor(key=KEY)


def stored(red: Redactor, method: str, value: Any) -> tuple[str, dict[str, int]]:
    out = red.redact_arguments(value) if method == "arguments" else red.redact_text(value)
    return (canonical_json(out.value) if method == "arguments" else str(out.value)), out.counts


def test_the_corpus_has_at_least_60_formats() -> None:
    formats = [s.format for s in SAMPLES]
    assert len(set(formats)) == len(formats) >= 60


def test_recall_is_complete_in_every_placement(red: Redactor, capsys: pytest.CaptureFixture[str]) -> None:
    missed: list[tuple[str, str, list[str]]] = []
    total = 0
    for sample in SAMPLES:
        for placement, method, value in placements(sample):
            total += 1
            text, counts = stored(red, method, value)
            leaked = leaks(sample, text)
            if leaked or not counts or not PLACEHOLDER.search(text):
                missed.append((sample.format, placement, leaked))
    recall = 1 - len(missed) / total
    with capsys.disabled():
        print(f"\nredaction recall: {recall:.2%} of {total} ({len(SAMPLES)} formats x 7 placements)")
    assert missed == []


def test_fingerprints_join_across_encodings(red: Redactor) -> None:
    """The fingerprint is of the decoded secret: the %-encoded, escaped and plain forms give one placeholder."""
    [sample] = [s for s in SAMPLES if s.format == "github_classic_pat"]
    plain = red.redact_text(sample.context).value
    marks = {PLACEHOLDER.findall(stored(red, method, value)[0])[0] for _, method, value in placements(sample)}
    assert marks == set(PLACEHOLDER.findall(plain))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def benign_strings() -> list[str]:
    out: list[str] = []
    for line in BENIGN.read_text().splitlines():
        event = json.loads(line)
        if event["event_type"] == "tool_call":
            out += list(_strings(event["arguments"])) + event["resources"] + list(_strings(event["claimed"]))
        elif event["event_type"] == "tool_result" and event["error"]:
            out.append(event["error"])
    return out


def test_benign_corpus_is_varied() -> None:
    strings = benign_strings()
    joined = "\n".join(strings)
    for needle in ("data:image/png;base64,", "https://", "/srv/", "C:\\Users\\"):
        assert needle in joined, needle
    assert sum(1 for s in strings if len(s) == 40 and set(s) <= set("0123456789abcdef")) >= 2  # SHA-1, git
    assert sum(1 for s in strings if len(s) == 64 and set(s) <= set("0123456789abcdef")) >= 2  # SHA-256
    assert len(strings) >= 300


def test_benign_corpus_stays_readable(red: Redactor, capsys: pytest.CaptureFixture[str]) -> None:
    strings = benign_strings()
    changed = [(s, red.redact_text(s).value) for s in strings if red.redact_text(s).value != s]
    with capsys.disabled():
        rate = len(changed) / len(strings)
        print(f"\nredaction false positives: {len(changed)} of {len(strings)} benign strings ({rate:.2%})")
    assert changed == []
    for line in BENIGN.read_text().splitlines():  # and whole argument objects, as the observer stores them
        event = json.loads(line)
        if event["event_type"] == "tool_call":
            assert red.redact_arguments(event["arguments"]).value == event["arguments"]


def test_detect_secrets_finds_nothing_the_catalog_misses(red: Redactor, capsys: pytest.CaptureFixture[str]) -> None:
    """detect-secrets (every plugin, adhoc line scan) as an independent check of the catalog."""
    from detect_secrets import settings
    from detect_secrets.core import scan  # a dev dependency: missing, the test fails (never skips)

    missed: list[tuple[str, str, str]] = []
    found = 0
    with settings.default_settings():
        for sample in SAMPLES:
            redacted = red.redact_text(sample.context).value
            for line in sample.context.splitlines():
                for secret in scan.scan_line(line):
                    value = secret.secret_value or ""
                    part_of_it = value in sample.needle and len(value) >= len(sample.needle) // 2
                    if not (part_of_it or sample.needle in value):
                        continue  # a high-entropy word of the context that is not the secret (e.g. a host name)
                    found += 1
                    if value in redacted:
                        missed.append((sample.format, secret.type, value[:12]))
        benign_hits = sum(  # its high-entropy plugins flag every word in an ad-hoc scan: left out here
            1
            for s in benign_strings()
            if any("High Entropy" not in x.type for line in s.splitlines() for x in scan.scan_line(line))
        )
    with capsys.disabled():
        print(
            f"\ndetect-secrets: {found} secrets of the corpus found by it, {len(missed)} missed by the catalog; "
            f"its plugins other than high-entropy flag {benign_hits} benign strings (the catalog: none)"
        )
    assert found >= 25  # the check means something
    assert missed == []


ADVERSARIAL = {
    "keywords": "password=" * 7282,
    "tokens": "token: " * 9362,
    "urls": "postgres:/" + ":a" * 32760,
    "at_signs": "a://" + "b:" * 21000 + "@" * 21000,
    "base64": "QUJD" * 16384,
    "base64_text": "cGFzc3dvcmQ9aHVudGVyMg" * 2978,
    "escapes": "\\u0041" * 10922,
    "percent": "%41" * 21845,
    "begin": "-----BEGIN RSA PRIVATE KEY-----" * 2114,
    "aws": "aws_secret_key=" * 4369,
    "runs": ("A1b2C3d4" * 5 + " ") * 1598,
    "mailchimp": "-us1" * 16384,
    "azure": "+ASt" * 16384,
    "quoted_passwords": 'password="' * 6553,  # was quadratic in the number of findings: 1 s
    "passwords": "password=x " * 5957,
    "entra": "0Q~" * 21845,
    "twilio": "SK" * 32768,
    "mixed": ("sk-ant- ghp_ AKIA eyJ sig= :/ Bearer " * 1800)[:65536],
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_64_kib_inputs_finish_fast(red: Redactor, name: str) -> None:
    text = ADVERSARIAL[name]
    assert 60_000 <= len(text) <= 70_000
    start = time.process_time()
    once = red.redact_text(text).value
    elapsed = time.process_time() - start
    assert elapsed < 0.5, f"{name}: {elapsed:.2f} s"  # about 50 ms at most here; 10x headroom
    assert red.redact_text(once).value == once
