"""The Faust app, its configuration, the order validation, the event store and the agent."""
