"""Live decisions: the two-stage protocol the stream job runs, as pure code with an injected clock.

DESIGN.md ("Late facts"): the live pipeline emits a provisional verdict when a call arrives, waits a
grace period for late identity and consent facts, corrects the verdict within grace, then marks it
final; a fact that arrives after grace produces an amendment flagged late. This package holds that
logic. The Faust job (``stream_jobs.app``) only decodes, hands events to these processors with the
wall clock and the Kafka partition, and sends what they return.

Stages
------
* :class:`Stage1` runs per partition of the calls and sessions topics (key: session_id). It keeps the
  session histories and, for each call still open, the little it needs to re-attribute it. It
  forwards every call, with its :class:`~detections.engine.Attribution`, to a **route**: the
  delegation key ``tenant/principal/agent_id`` when the attribution names one, otherwise the
  session route ``tenant/session_id`` (unbound sessions). A session fact re-attributes the open
  calls it can affect; a changed attribution is forwarded with the next attribution version.
* :class:`Stage2` runs per partition of the internal topic and the grants topic (key: the route).
  It keeps grant histories and owns each open call: it decides (:func:`~detections.engine.authorize`),
  numbers evidence versions, corrects on new grant facts and attributions, finalizes at the
  deadline, and amends later (flagged ``late`` when the fact came after the deadline).

Timing: a call's **deadline** is its arrival at stage 1 plus ``grace`` (wall clock, injected). Facts
that reach their stage before the deadline are "within grace": the final verdict then equals
:meth:`DecisionEngine.decide <detections.engine.DecisionEngine.decide>` over all facts, as
``scopewatch replay`` computes it. A call stays open for amendments ``amend_window`` after its
deadline; facts later than that no longer change live evidence (``scopewatch verify`` re-derives
verdicts from the raw events).

Ownership: evidence versions of a call are numbered 1, 2, 3... by whichever stage-2 route owns it.
When a re-attribution moves the call to another route (a session bound late moves it from the
session route to its delegation), the old owner hands the call over with its version counter and
leaves a forwarding record, so later updates sent to the first route still reach the owner. Stage 1
always addresses the route it first sent the call to. Every message carries the attribution
version, so duplicates and stale updates (at-least-once delivery, rebalances) are ignored.

State lives in injected mutable mappings of ``str -> bytes`` (Faust tables in the job, dicts in
tests); in-memory indexes are rebuilt from them with ``rebuild()`` after a recovery.

Speed (``bench/profile_decisions.py``): between and inside the stages calls travel as plain JSON
arrays with integer microsecond times; no pydantic model is built until evidence, findings or
rules need one (and then without re-validation); what does not change from call to call is
computed once and shared: the attribution per session state (:attr:`SessionHistory.memo`), the
grant states per interval of time (:meth:`GrantHistory.slot_at`), one compiled regex per grant
pattern list, the part of a decision that depends only on the grants and the tool name (per slot),
the parsed attribution per attribution line (by its digest). Nothing is kept in memory per open
call: objects kept per call for the grace period cost more in garbage collection than parsing the
stored record again at the deadline (measured). (A final call is kept for at most twice
``sequence_slack`` after its deadline, for the sequence rules: see ``SequenceKeeper.release``.) Store
writes: one per changed record, never an unchanged value (each write is a changelog message).

Rules: per-call rules run on a call's final verdict at once; sequence rules see final calls
``sequence_slack`` after their deadline, in (event time, call id) order as replay does, so calls of
a delegation that arrive less than the slack apart are counted in event-time order.

Modules (this package's public names are re-exported here):

* :mod:`~detections.live.wire`: every byte format (keys, internal messages, stored records), one
  named ``__slots__`` class per record;
* :mod:`~detections.live.stage1` and :mod:`~detections.live.stage2`: the two processors;
* :mod:`~detections.live.sequence`: stage 2's sequence-rule state, held calls and their records;
* :mod:`~detections.live.evidence`: evidence records and the call as rules read it;
* :mod:`~detections.live.common`: configuration, counters, outputs, clock, caches.
"""

from detections.live.common import Forward, LiveConfig, LiveCounters, Output
from detections.live.evidence import EVIDENCE_NAMESPACE, build_evidence, evidence_id_for, fact_refs
from detections.live.stage1 import Stage1
from detections.live.stage2 import Stage2
from detections.live.wire import (
    HELD_FORMAT,
    MESSAGE_FORMAT,
    SEQUENCE_FORMAT,
    call_key,
    route_for,
    session_key,
    session_route,
    tick_message,
)

__all__ = [
    "EVIDENCE_NAMESPACE",
    "HELD_FORMAT",
    "MESSAGE_FORMAT",
    "SEQUENCE_FORMAT",
    "Forward",
    "LiveConfig",
    "LiveCounters",
    "Output",
    "Stage1",
    "Stage2",
    "build_evidence",
    "call_key",
    "evidence_id_for",
    "fact_refs",
    "route_for",
    "session_key",
    "session_route",
    "tick_message",
]
