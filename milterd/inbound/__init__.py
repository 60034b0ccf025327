"""Inbound adapters: the pymilter adapter, TLS facts from MTA macros, Postfix policy delegation."""
