"""Pure policy: DNS names (RFC 9525), DNs, coverage, Domain Security decisions, the trace header, failure reasons. No I/O."""
