"""Calls to the upstream Messages API: the connection pool, its httpx2 transport and the client."""
