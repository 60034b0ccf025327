"""Outbound Domain Security: the TLS policy resolver (send list, DANE, MTA-STS), its DNS client, the socketmap, the maillog parser and follower, TLS-RPT."""
