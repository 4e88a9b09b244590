"""Attachments, the pure part: what a file is (from its bytes), its checks, and what the model
gets. No I/O but the PDF worker process; the bytes are stored by `cortex.store.attachments`."""
