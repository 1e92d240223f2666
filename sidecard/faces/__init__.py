"""The app faces: the NDJSON socket (`ndjson.py`) and the Anthropic-compatible HTTP face (`http.py`), on one base."""
