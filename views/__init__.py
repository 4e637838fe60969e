"""The in-memory view of every order, rebuilt from the event log, and the HTTP views serving it."""
