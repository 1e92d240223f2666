"""Pure reliability policies: plain objects, `now` and the random source passed in, no I/O."""
