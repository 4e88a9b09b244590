"""Fan-out of encoded events to subscribers: in one process, or across processes over Redis."""
