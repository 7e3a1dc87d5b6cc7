"""Host adapters, UI, HTTP API and the command line. The only layer that knows hosts exist."""
