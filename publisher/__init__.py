"""Generate unique orders from the model order and publish them to NATS JetStream.

``python -m publisher --help`` (or ``orders-publisher --help``) describes the command line.
"""
