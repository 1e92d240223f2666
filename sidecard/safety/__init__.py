"""Safety: output guardrails, prompt-injection defences, the outbound data policy, per-app access control and
the audit trail.

Each module is a pure core (settings in, decisions out, no I/O) except `access.load_credentials` and `audit`,
which read and write local files. The engine, the faces and the control layer plug them in; nothing here
imports them.
"""
