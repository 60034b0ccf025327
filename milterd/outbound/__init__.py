"""Outbound Domain Security: the TLS policy resolver (send list, DANE, MTA-STS), the socketmap, the maillog follower, TLS-RPT."""
