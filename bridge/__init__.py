"""The NATS JetStream side: embedded server, stream and consumer, and the bridge to the agent."""
