"""Full-text search: the query language, the cursor, and the index's queries (docs/search.md)."""
